"""The engine factory: an engine by name; heavy engines are imported only when chosen."""

from __future__ import annotations

from shared.errors import Unsupported

from .base import Engine
from .fake import FakeEngine


ENGINES = ("diffusers", "demo", "tiny", "fake")


def create_engine(name: str, **options) -> Engine:
    """The engine called ``name``; heavy engines are imported only when chosen.

    ``diffusers``: the real engine on the configured models (options: device, dtype,
    offload, memory_budget_gb, lora_dir, ..., config_file and trust_request_paths: any local
    model path a request names, for a server only the user's own command uses); ``demo``: the
    real engine on the embedded trained demo model (no download, no GPU; outline
    conditions only);
    ``tiny``: the real engine on random-weight tiny models (every condition; tests and
    benchmarks); ``fake``: deterministic pixels without torch (option: step_seconds).
    """
    if name == "fake":
        return FakeEngine(step_seconds=float(options.get("step_seconds") or 0.0))
    if name in ("diffusers", "demo", "tiny"):
        from .diffusers.engine import DiffusersEngine  # torch: only when chosen
        options = {k: v for k, v in options.items() if v is not None and k != "step_seconds"}
        if name in ("tiny", "demo"):
            # the embedded models are small fp32 ones: the device, threads, the LoRA folder
            # and the fast path apply
            from .diffusers.acceleration import OPTION_NAMES
            kept = {k: v for k, v in options.items()
                    if k in ("device", "cpu_threads", "lora_dir") or k in OPTION_NAMES}
            return (DiffusersEngine.embedded if name == "tiny" else DiffusersEngine.demo)(**kept)
        config_file = options.pop("config_file", None)
        return DiffusersEngine.from_options(options, config_file)
    raise Unsupported(f"Unknown engine {name!r}; choose one of {', '.join(ENGINES)}.",
                      field="engine")
