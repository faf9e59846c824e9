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
from typing import Mapping, Protocol, Sequence

from shared.images import Image
from shared.messages import GenerateRequest, Models, Preprocess

from ..annotators.registry import Annotated


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
