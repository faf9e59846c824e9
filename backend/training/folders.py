"""Where training reads and writes (no torch here).

* A ``train`` message from a client names its dataset and output folders inside the
  server's training folders (:class:`TrainRoots`: ``[server] train_data_root`` and
  ``train_out_root``, by default ``datasets`` and ``models/trained`` in the per-user data
  folder). Relative names resolve there; ``..``, absolute paths elsewhere and links that
  lead out are refused with one :class:`shared.errors.PathRefused`, worded the same
  whether the path exists or not (``backend.confine``). Its base model must be one the
  model catalogue offers a client (configured, built in, in the hub cache or inside a
  models folder).
* ``controlcanvas train`` in the user's own shell may name any folder the user can read
  and write: the user is the one asking.
* Either way the trainer writes only into a new or empty output folder, or resumes a run
  it made there: each run is marked with :data:`MANIFEST` (:func:`check_output`,
  :func:`mark_output`), so training never overwrites or deletes files it did not write.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from shared.errors import ConfigError, PathRefused

from ..confine import confine
from ..engines.catalogue import Catalogue, ModelConfig
from .errors import TrainingError

log = logging.getLogger(__name__)

MANIFEST = "controlcanvas-run.json"
MANIFEST_KIND = "controlcanvas controlnet training run"


@dataclass(frozen=True)
class TrainRoots:
    """The folders a client's ``train`` message may use, and the config file whose model
    tables say which base models it may name."""

    data: Path
    out: Path
    config_file: Optional[Path] = None

    def confine(self, data: str, out: str, base: str) -> Tuple[str, str, str]:
        """(data folder, output folder, base model path) for a client's names; PathRefused
        for a folder outside the roots, ModelMissing / PathRefused for a base it may not
        use."""
        data_path = confine(data, [self.data], lambda: PathRefused(
            f"The training data {data!r} is not a folder this server lets clients use. Name "
            f"a dataset folder inside the server's training data folder ([server] "
            f"train_data_root); relative names are looked up there.", field="data"))
        out_path = confine(out, [self.out], lambda: PathRefused(
            f"The output {out!r} is not a folder this server lets clients write. Name a new "
            f"folder inside the server's training output folder ([server] train_out_root); "
            f"relative names are made there.", field="out"), allow_root=False)
        try:
            models = ModelConfig.from_toml(self.config_file)
        except ConfigError as err:  # the owner's problem: its path stays in the log
            log.error("cannot read the model configuration: %s", err.message)
            raise TrainingError("The server's model configuration is broken, so it cannot "
                                "pick the base model; its owner should run "
                                "`controlcanvas doctor`.", field="base") from None
        return str(data_path), str(out_path), base_path(base, Catalogue(models))


def base_path(name: str, catalogue: Catalogue) -> str:
    """The local path of the base model ``name`` as ``catalogue`` resolves it (ModelMissing
    says how to get it); Stable Diffusion 1.x only."""
    resolved = catalogue.resolve_base(name)
    if resolved.family != "sd15":
        raise TrainingError(f"Training a ControlNet for {resolved.family.upper()} bases is not "
                            f"supported yet; pick a Stable Diffusion 1.x base.", field="base")
    return resolved.path


def _is_ours(out: Path) -> bool:
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("kind") == MANIFEST_KIND


def check_output(out: Path, resume: Optional[str] = None) -> None:
    """Refuse an output folder training must not write into; nothing is changed.

    ``resume`` None: ``out`` must be new or empty. ``"latest"``: ``out`` must hold a run
    this trainer made (to continue). A checkpoint folder: either is fine."""
    continuing = resume == "latest"
    if not out.exists():
        if continuing:
            raise TrainingError(f"Nothing to resume: {out} does not exist. Start without "
                                f"--resume.", field="resume")
        return
    if not out.is_dir():
        raise TrainingError(f"The output {out} is a file, not a folder; choose a folder name "
                            f"for the trained ControlNet.", field="out")
    others = [p.name for p in out.iterdir() if p.name != MANIFEST]
    ours = _is_ours(out)
    if others and not ours:
        raise TrainingError(f"The output folder {out} is not empty and holds no ControlCanvas "
                            f"training run; nothing in it was changed. Choose a new or empty "
                            f"folder for --out.", field="out")
    if continuing and not others:
        raise TrainingError(f"Nothing to resume: {out} holds no training run. Start without "
                            f"--resume.", field="resume")
    if others and resume is None:
        raise TrainingError(f"The output folder {out} holds an earlier training run. Continue "
                            f"it with --resume (the train message's resume), or choose a new "
                            f"folder for --out; nothing in it was changed.", field="out")


def mark_output(out: Path) -> None:
    """Create ``out`` if needed and mark it as this trainer's run (kept when it exists)."""
    out.mkdir(parents=True, exist_ok=True)
    if not _is_ours(out):
        manifest = {"kind": MANIFEST_KIND, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (out / MANIFEST).write_text(json.dumps(manifest) + "\n", encoding="utf-8")
