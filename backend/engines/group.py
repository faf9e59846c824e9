"""Several engines behind one: one engine per device, for a server with several GPUs.

The server sees an :class:`EngineGroup` as one engine (its name, models and settings are
those of its first engine) and starts one job worker per engine in it
(backend.server.jobs). Each engine owns its device and its model cache; nothing is shared
between them.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Mapping, Optional, Sequence

from shared.errors import ConfigError
from shared.images import Image
from shared.messages import GenerateRequest, Models, Preprocess

from .base import Engine, Generated, JobContext, Scalar, engine_info

log = logging.getLogger(__name__)


class EngineGroup:
    """``engines[i]`` runs on ``devices[i]``; called as one engine, the first one answers."""

    def __init__(self, engines: Sequence[Engine], devices: Sequence[str]) -> None:
        if not engines or len(engines) != len(devices):
            raise ValueError("an EngineGroup needs one device name per engine")
        self.engines: List[Engine] = list(engines)
        self.devices: List[str] = list(devices)
        self.name = getattr(engines[0], "name", "unknown")
        self.preempts_between_steps = all(getattr(e, "preempts_between_steps", False)
                                          for e in engines)

    def generate(self, request: GenerateRequest, images: Mapping[int, Image],
                 ctx: JobContext) -> Sequence[Generated]:
        return self.engines[0].generate(request, images, ctx)

    def preprocess(self, message: Preprocess, image: Image, ctx: JobContext):
        return self.engines[0].preprocess(message, image, ctx)

    def models(self) -> Models:
        return self.engines[0].models()

    def info(self) -> Dict[str, Scalar]:
        info = engine_info(self.engines[0])
        info.pop("device", None)
        return {"workers": len(self.engines), "devices": ",".join(self.devices), **info}

    def close(self) -> None:
        for engine in self.engines:
            engine.close()


def engines_of(engine: Engine) -> List[Engine]:
    """The engines one job worker each runs: a group's, else the engine itself."""
    return list(getattr(engine, "engines", None) or [engine])


def devices_of(engine: Engine) -> List[str]:
    """The device name of each of :func:`engines_of` (``""`` where unknown)."""
    devices = getattr(engine, "devices", None)
    if devices:
        return list(devices)
    return [str(getattr(engine, "device", "") or "")]


def free_memory(engine: Engine, device: str) -> Optional[int]:
    """Free bytes on ``device`` (CUDA), or what the engine says (``free_memory()``);
    None when unknown (the CPU): placement then falls back to the least used worker."""
    own = getattr(engine, "free_memory", None)
    if callable(own):
        return own()
    if device.startswith("cuda"):
        from .diffusers.devices import free_bytes  # torch: only for CUDA devices
        return free_bytes(device)
    return None


def parse_devices(spec: str) -> List[str]:
    """``--devices``: ``all`` (every CUDA GPU), or names separated by commas
    (``cuda:0,cuda:1``; ``cpu,cpu`` runs two CPU workers, for tests)."""
    text = spec.strip()
    if text.lower() == "all":
        from .diffusers.devices import cuda_devices  # torch: only when asked
        found = cuda_devices()
        if not found:
            raise ConfigError("--devices all: no CUDA GPU is visible to torch; name the "
                              "devices (e.g. cuda:0,cuda:1) or leave --devices out.")
        return found
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ConfigError(f"--devices {spec!r} names no device; write e.g. cuda:0,cuda:1 "
                          f"or all.")
    cuda = [n for n in names if n != "cpu"]
    if len(set(cuda)) != len(cuda):
        raise ConfigError(f"--devices {spec!r} names a GPU twice; give each GPU once (two "
                          f"workers on one GPU would only compete for its memory).")
    return names


def create_engines(create, name: str, devices: Sequence[str], **options) -> Engine:
    """One engine per device, built by ``create(name, device=..., **options)`` (the
    factory), as an :class:`EngineGroup`; a single device gives the plain engine."""
    built: List[Engine] = []
    try:
        for device in devices:
            built.append(create(name, **{**options, "device": device}))
    except BaseException:
        for engine in built:
            engine.close()
        raise
    if len(built) == 1:
        return built[0]
    log.info("%d %s engines on %s", len(built), name, ", ".join(devices))
    return EngineGroup(built, devices)
