"""Typed errors of training (no torch): bad data, bad options, incompatible resume."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

from shared.errors import ControlCanvasError

MAX_LISTED = 20  # problems spelled out in the message; all of them are in .problems


@dataclass(frozen=True)
class Problem:
    """One bad pair or file: ``name`` is the path relative to the dataset folder."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


class DatasetError(ControlCanvasError):
    """The training data is unusable; ``problems`` lists every bad file by name."""

    code = "bad_dataset"

    def __init__(self, folder: Path, problems: Sequence[Problem]) -> None:
        self.folder = Path(folder)
        self.problems: Tuple[Problem, ...] = tuple(problems)
        listed = "\n  ".join(str(p) for p in self.problems[:MAX_LISTED])
        more = len(self.problems) - MAX_LISTED
        tail = f"\n  ... and {more} more" if more > 0 else ""
        count = len(self.problems)
        super().__init__(
            f"The training data in {self.folder} has {count} problem"
            f"{'s' if count != 1 else ''}; fix or remove these pairs and run again:\n  "
            f"{listed}{tail}", field="data")

    @property
    def names(self) -> List[str]:
        return [p.name for p in self.problems]


class TrainingError(ControlCanvasError):
    """Training options that cannot work (say which and how to fix), or a resume that
    does not match the checkpoint."""

    code = "bad_training"
