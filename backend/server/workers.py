"""The job workers of one server: one per engine (one per device), and which one runs a job.

A :class:`Worker` is the thread that owns one engine (backend.engines.group: one engine per
device) and the job it runs. backend.server.jobs decides *which job* starts next (fairness
by client, the live lane); this module decides *where*: :func:`place` picks, among the idle
workers, the one that already holds the job's models (its base model and ControlNets),
then the one with the most free device memory, then the least used one.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, FrozenSet, Optional, Sequence

from shared.messages import Generate

from ..engines.base import Engine
from ..engines.group import free_memory

# what a RuntimeError from torch says when the device itself is gone or its context broken
# (every later call on it fails too), as opposed to a job's own failure
DEVICE_LOST = ("CUDA error: an illegal memory access", "CUDA error: unspecified launch failure",
               "CUDA error: device-side assert", "CUDA error: uncorrectable ECC",
               "CUDA error: the launch timed out", "CUDA error: unknown error",
               "CUDA driver version is insufficient", "no CUDA-capable device")


@dataclass(eq=False)
class Worker:
    """One job worker: its engine and device, the job it runs (and a live job nested in
    that one's pause), and what its engine holds."""
    index: int
    engine: Engine
    device: str = ""
    running: Optional[Any] = None  # a backend.server.jobs.Job (jobs imports this module)
    nested: Optional[Any] = None
    idle: bool = False  # waiting for a job (under the manager's lock)
    alive: bool = True  # False once its thread stopped on a lost device
    models: FrozenSet[str] = frozenset()  # the models of its last job
    jobs_run: int = 0
    thread: Optional[threading.Thread] = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return f"{self.index}" + (f" ({self.device})" if self.device else "")

    @property
    def free(self) -> bool:
        """Idle and nothing handed to it yet: a job may be placed on it."""
        return self.alive and self.idle and self.running is None

    def loaded(self) -> FrozenSet[str]:
        """The models its engine holds: the engine's own ``loaded_models()`` where it has
        one, else those of the last job it ran."""
        own = getattr(self.engine, "loaded_models", None)
        return frozenset(own()) if callable(own) else self.models


def job_models(message) -> FrozenSet[str]:
    """What a job loads: its base model (``""``: the default one) and its ControlNets."""
    if not isinstance(message, Generate):
        return frozenset()
    request = message.request
    return frozenset({request.base_model, *(unit.model for unit in request.controls)})


def place(models: FrozenSet[str], candidates: Sequence[Worker]) -> Worker:
    """The worker for a job that loads ``models``: the one holding most of them already,
    then the one with the most free device memory, then the one that ran fewest jobs."""
    def score(worker: Worker):
        free = free_memory(worker.engine, worker.device)
        return (len(models & worker.loaded()), -1 if free is None else free,
                -worker.jobs_run, -worker.index)
    return max(candidates, key=score)


def device_lost(err: BaseException) -> bool:
    """True when ``err`` says the worker's device is unusable (not just this job failed):
    anything that is not an ``Exception`` (the thread itself is going), or one of torch's
    CUDA errors after which every call on that device fails."""
    if not isinstance(err, Exception):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(marker in text for marker in DEVICE_LOST)
