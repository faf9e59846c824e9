"""``controlcanvas bench memory``: what each loading choice needs (backend/engines/fit.py).

Measured on the tiny stacks (built locally): the parameter bytes of every loaded component (and its buffers) next to
what the planner computes from the files' headers (they must agree), the GGUF Q8_0 tiny
transformer's bytes when ``gguf`` is installed, and on CUDA the peak GPU memory of one
64² image per loading choice.  Computed for the real models: weights and the GPU bytes
each choice needs per family, in bf16, fp8 and with GGUF transformers.  One JSON object.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Dict

FAMILIES = ("sd15", "flux", "sd3", "zimage")


def _tiny(family: str, root: Path, cuda: bool) -> Dict[str, Any]:
    from ..engines import fit, tiny
    from ..engines.catalogue import Catalogue, ModelConfig
    from ..engines.diffusers.cache import module_bytes
    from ..engines.diffusers.engine import DiffusersEngine

    tiny.ensure_tiny(family, root)
    engine = DiffusersEngine(Catalogue(ModelConfig(tiny_root=str(root), roots=(str(root),))),
                             device="cpu", dtype="fp32")
    resolved = engine.catalogue.resolve_base(f"tiny-{family}")
    entry = engine._load_base(resolved)
    sized = fit.sized_for(resolved.name, family, resolved.path, "fp32")
    computed = {c.name: c.nbytes for c in sized.components}
    modules = {name: module for name, module in entry.pipe.components.items()
               if name in computed}
    measured = {name: sum(p.numel() * p.element_size() for p in module.parameters())
                for name, module in modules.items()}
    out: Dict[str, Any] = {"measured_bytes": measured, "computed_bytes": computed,
                           "agree": measured == computed,
                           "buffer_bytes": {name: module_bytes(module) - measured[name]
                                            for name, module in modules.items()},
                           "needs": sized.needs()}
    if family == "flux":
        out["gguf_q8_0"] = _gguf(entry.pipe.transformer, root)
    if cuda:
        out["peak_cuda_bytes"] = _peaks(entry.pipe)
    engine.close()
    return out


def _gguf(transformer, root: Path) -> Dict[str, Any]:
    try:
        import gguf  # noqa: F401
    except ImportError:
        return {"skipped": "pip install \"controlcanvas[quant]\" (gguf)"}
    from ..engines.tiny_gguf import write_gguf

    path = write_gguf(transformer, root / "tiny-flux-Q8_0.gguf")
    params = sum(p.numel() for p in transformer.parameters())
    return {"file_bytes": path.stat().st_size, "fp32_bytes": params * 4,
            "bytes_per_param": round(path.stat().st_size / params, 3)}


def _peaks(pipe) -> Dict[str, int]:
    """Peak CUDA bytes of one 64² image, 2 steps, per loading choice."""
    import torch

    peaks: Dict[str, int] = {}
    for choice in ("gpu", "model", "sequential"):
        pipe.remove_all_hooks()
        pipe.to("cpu")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        if choice == "gpu":
            pipe.to("cuda")
        elif choice == "model":
            pipe.enable_model_cpu_offload()
        else:
            pipe.enable_sequential_cpu_offload()
        pipe("a cat", height=64, width=64, num_inference_steps=2, output_type="np")
        peaks[choice] = int(torch.cuda.max_memory_allocated())
    pipe.remove_all_hooks()
    return peaks


def bench_memory() -> Dict[str, Any]:
    import torch

    from ..engines import fit

    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="cc-bench-memory-") as tmp:
        measured = {family: _tiny(family, Path(tmp), cuda) for family in FAMILIES}
    return {"tiny": measured, "real": fit.real_size_table(),
            "working_bytes": dict(fit.WORKING), "device": "cuda" if cuda else "cpu"}
