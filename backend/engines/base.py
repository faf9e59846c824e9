"""The Engine protocol: what the job worker calls, and the context it passes.

An engine turns a validated request plus its images into images.  It is called
from the job worker thread only (one thread owns the GPU), so an engine needs no
locking of its own.  It reports progress and previews through the
:class:`JobContext` it is given; ``ctx.progress`` raises
:class:`~shared.errors.Cancelled` when the job was cancelled, which is how a
running job stops within one step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Protocol, Sequence, Union

from shared.images import Image
from shared.messages import GenerateRequest, Models, Preprocess

from ..annotators.registry import Annotated

Scalar = Union[bool, int, float, str]


class JobContext(Protocol):
    job_id: str

    def progress(self, step: int, total: int, stage: str = "denoise") -> None:
        """Report progress; raises Cancelled if the job was cancelled meanwhile."""

    def wants_preview(self, step: int) -> bool:
        """Whether a preview for this step would be sent (so engines skip the work if not)."""

    def preview(self, step: int, image: Image) -> None:
        """Send a small preview image of the current state."""

    def check_cancelled(self) -> None:
        """Raise Cancelled if the job was cancelled."""


class NullContext:
    """A JobContext that reports nowhere and is never cancelled: for running an engine
    directly (benchmarks, tests, computing the expected pixels of a request)."""

    job_id = "0" * 32

    def progress(self, step: int, total: int, stage: str = "denoise") -> None:
        pass

    def wants_preview(self, step: int) -> bool:
        return False

    def preview(self, step: int, image: Image) -> None:
        pass

    def check_cancelled(self) -> None:
        pass


@dataclass(frozen=True)
class Generated:
    image: Image
    seed: int


class Engine(Protocol):
    """``name`` is what the welcome and the log call it.  An engine may also have
    ``info() -> Dict[str, bool | int | float | str]``: its settings (device, precision,
    fast path), which the doctor prints and the welcome carries (see :func:`engine_info`)."""

    name: str

    def generate(self, request: GenerateRequest, images: Mapping[int, Image],
                 ctx: JobContext) -> Sequence[Generated]:
        """Run one request (``request.seed`` is already resolved, never -1)."""

    def preprocess(self, message: Preprocess, image: Image, ctx: JobContext) -> Annotated:
        """Turn a canvas image into a control image (usually ``preprocess.annotate``)."""

    def models(self) -> Models:
        """What this engine can use."""

    def close(self) -> None:
        """Release models and memory."""


def engine_info(engine) -> Dict[str, Scalar]:
    """The engine's ``info()`` (its settings: device, precision, fast path), or {} for an
    engine without one; only JSON scalars, so it fits the welcome message."""
    info = getattr(engine, "info", None)
    if not callable(info):
        return {}
    return {str(k): v for k, v in dict(info()).items()
            if isinstance(v, (bool, int, float, str))}


def info_line(info: Mapping[str, Scalar]) -> str:
    """One line for people: ``device cuda:0 · dtype fp16 · sdpa on · compile off ...``."""
    def show(value: Scalar) -> str:
        if value is True:
            return "on"
        if value is False:
            return "off"
        return str(value)

    return " · ".join(f"{k} {show(v)}" for k, v in info.items())
