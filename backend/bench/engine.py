"""Engine benchmarks; each function returns a JSON-ready dict.

* :func:`bench_engine` - our DiffusersEngine path against the bare diffusers
  pipeline on the same tiny model, seed, steps and size, interleaved, for each tiny
  stack (SD1.5 + ControlNet; SDXL + union ControlNet; Flux.1 + its union ControlNet; SD3.5 +
  a ControlNet); ``ratio`` is the median of the
  per-pair ours / bare (target <= 1.03).
* :func:`bench_controlnet_cost` - per-step time of an SD1.5-sized UNet alone vs
  UNet + ControlNet (random weights, batch 2, 64x64 latent); ``ratio`` compares
  with the ControlNet paper's ~+34 %.
* :func:`bench_scaling` - the tiny model through the engine at growing output
  sizes: time and peak RSS per size and the fitted exponent of time vs pixels.

All run on CPU unless told otherwise and never download anything.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

from ..engines import tiny
from ..engines.base import NullContext
from ..engines.catalogue import Catalogue, ModelConfig
from ..imaging import to_array


def _tiny_engine(tiny_root: Optional[str], device: str):
    from ..engines.diffusers.engine import DiffusersEngine  # torch

    return DiffusersEngine(Catalogue(ModelConfig(tiny_root=tiny_root)), device=device)



def _control_image(width: int, height: int):
    from shared.images import Image

    rng = np.random.default_rng(0)
    array = np.zeros((height, width, 4), np.uint8)
    array[..., 3] = 255
    for _ in range(8):
        array[rng.integers(0, height), :, :3] = 255
        array[:, rng.integers(0, width), :3] = 255
    return Image(width, height, array.tobytes())


def _set_threads(threads: Optional[int]) -> None:
    """Tiny models gain nothing from intra-op threads, and on a busy machine spinning
    OpenMP threads add noise; benchmarks of tiny models default to one."""
    if threads:
        import torch
        torch.set_num_threads(int(threads))


# The tiny stacks ``bench engine`` compares: base, ControlNet folder, condition, and the bare
# diffusers pipeline that runs them.
STACKS = {
    "sd15": ("tiny-sd15", "sd15", "lines", "StableDiffusionControlNetPipeline"),
    "sdxl-union": ("tiny-sdxl", "sdxl", tiny.UNION, "StableDiffusionXLControlNetUnionPipeline"),
    "flux-union": ("tiny-flux", "flux", "union", "FluxControlNetPipeline"),
    "sd3": ("tiny-sd3", "sd3", "lines", "StableDiffusion3ControlNetPipeline"),
    "zimage": ("tiny-zimage", "zimage", "union", "ZImageControlNetPipeline"),
    "qwen-union": ("tiny-qwen", "qwen", "union", "QwenImageControlNetPipeline"),
}
# The bare pipeline's ControlNet class and control arguments per family (the DiT families:
# ``control_image``; Flux's union model: lineart's control mode, canny = 0; Qwen-Image: cfg
# is its true guidance, which runs with a negative prompt, the blank one the engine sends).
_DIT_NETS = {"flux": ("FluxControlNetModel", {"control_mode": 0}),
             "sd3": ("SD3ControlNetModel", {}),
             "zimage": ("ZImageControlNetModel", {"controlnet_conditioning_scale": 1.0}),
             "qwen": ("QwenImageControlNetModel", {"negative_prompt": " "})}
# Z-Image's pipelines read guidance g as pos + g x (pos - neg): our cfg c is g = c - 1.
_GUIDANCE_OFFSET = {"zimage": 1.0}


def bench_engine(repeats: int = 21, steps: int = 10, size: int = 64,
                 tiny_root: Optional[str] = None, device: str = "cpu",
                 threads: Optional[int] = 1,
                 stacks: Sequence[str] = tuple(STACKS)) -> Dict[str, Any]:
    """Our engine vs the bare pipeline on each tiny stack (``STACKS``): same model,
    ControlNet, seed, steps.  ``sd15``: SD1.5 + a ControlNet; ``sdxl-union``: SDXL + the
    union ControlNet against diffusers' ``StableDiffusionXLControlNetUnionPipeline``.

    The top-level figures are the first stack's (as before there were stacks);
    ``stacks`` holds every stack's, ``worst_ratio`` the highest ratio."""
    import torch

    _set_threads(threads)
    engine = _tiny_engine(tiny_root, device)
    results = {name: _bench_stack(engine, name, repeats, steps, size, tiny_root, device)
               for name in stacks}
    engine.close()
    out = dict(results[stacks[0]])
    out.update({"bench": "engine", "threads": torch.get_num_threads(), "stacks": results,
                "worst_ratio": max(r["ratio"] for r in results.values()),
                "target_ratio": 1.03})
    return out


def _bench_stack(engine, stack: str, repeats: int, steps: int, size: int,
                 tiny_root: Optional[str], device: str) -> Dict[str, Any]:
    """Interleaved pairs (each pair back to back, alternating order): ``ratio`` is the
    median of the per-pair ratios, which cancels slow spells of a shared machine; the
    ratio of medians and of minimums are reported too."""
    import diffusers
    import torch
    from PIL import Image as PILImage

    from shared.messages import ControlUnit, GenerateRequest

    base, family, net_name, pipeline = STACKS[stack]
    folder = tiny.ensure_tiny(family, Path(tiny_root) if tiny_root else None)
    control = _control_image(size, size)
    request = GenerateRequest(width=size, height=size, prompt="a red coat", seed=42,
                              steps=steps, cfg=7.0, sampler="dpmpp_2m_karras", base_model=base,
                              controls=(ControlUnit(condition="lineart", image=0),))
    ctx = NullContext()
    union = net_name == tiny.UNION and family == "sdxl"
    net_cls = diffusers.ControlNetUnionModel if union else diffusers.ControlNetModel
    if family in _DIT_NETS:
        net_cls = getattr(diffusers, _DIT_NETS[family][0])
    net = net_cls.from_pretrained(folder / "controlnets" / net_name, local_files_only=True)
    extra = dict(safety_checker=None, feature_extractor=None,
                 requires_safety_checker=False) if family == "sd15" else {}
    bare = getattr(diffusers, pipeline).from_pretrained(folder, controlnet=net,
                                                        local_files_only=True, **extra)
    bare = bare.to(device)
    bare.set_progress_bar_config(disable=True)
    control_pil = PILImage.fromarray(to_array(control)[..., :3].copy())
    images = {"control_image": [control_pil], "control_mode": [3]} if union else \
        {"image": control_pil}
    if family in _DIT_NETS:
        images = dict(_DIT_NETS[family][1], control_image=control_pil)
    cfg_name = "true_cfg_scale" if family == "qwen" else "guidance_scale"  # (.dit_qwen)

    def ours():
        return engine.generate(request, {0: control}, ctx)[0].image

    def plain():
        generator = torch.Generator(device=device).manual_seed(request.seed)
        with torch.random.fork_rng(devices=[device] if device.startswith("cuda") else []):
            torch.manual_seed(request.seed)  # SD3's ControlNet pipeline draws from it (.dit)
            guidance = request.cfg - _GUIDANCE_OFFSET.get(family, 0.0)
            return bare(request.prompt, num_inference_steps=steps, generator=generator,
                        height=size, width=size, **{cfg_name: guidance}, **images).images[0]

    a, b = ours(), plain()  # warm-up (loads, allocator) and an equality check
    same = np.array_equal(to_array(a)[..., :3], np.asarray(b))
    times = {"ours": [], "bare": []}
    for i in range(repeats):
        order = (("ours", ours), ("bare", plain)) if i % 2 == 0 else \
            (("bare", plain), ("ours", ours))
        for name, fn in order:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = statistics.median(o / b for o, b in zip(times["ours"], times["bare"]))
    return {"stack": stack, "size": size, "steps": steps, "repeats": repeats,
            "ours_median_s": round(med["ours"], 5), "bare_median_s": round(med["bare"], 5),
            "ours_min_s": round(min(times["ours"]), 5),
            "bare_min_s": round(min(times["bare"]), 5),
            "ratio": round(paired, 4),
            "ratio_of_medians": round(med["ours"] / med["bare"], 4),
            "ratio_min": round(min(times["ours"]) / min(times["bare"]), 4),
            "same_pixels": bool(same), "bare": pipeline}


def bench_controlnet_cost(steps: int = 2, batch: int = 2, latent: int = 64,
                          dtype: str = "fp32", device: str = "cpu") -> Dict[str, Any]:
    """Per-step UNet vs UNet + ControlNet at SD1.5 size with random weights."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16,
                   "fp16": torch.float16}[dtype]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=latent, cross_attention_dim=768,
                                attention_head_dim=8).eval()
    net = ControlNetModel.from_unet(unet).eval()
    if torch_dtype != torch.float32:
        unet.to(dtype=torch_dtype)
        net.to(dtype=torch_dtype)
    unet.to(device)
    net.to(device)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 4, latent, latent, generator=g).to(device, torch_dtype)
    text = torch.randn(batch, 77, 768, generator=g).to(device, torch_dtype)
    cond = torch.rand(batch, 3, latent * 8, latent * 8, generator=g).to(device, torch_dtype)
    t = torch.tensor(500, device=device)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def unet_only():
        unet(sample, t, encoder_hidden_states=text)

    def with_controlnet():
        down, mid = net(sample, t, encoder_hidden_states=text, controlnet_cond=cond,
                        return_dict=False)
        unet(sample, t, encoder_hidden_states=text, down_block_additional_residuals=down,
             mid_block_additional_residual=mid)

    times = {"unet": [], "unet_controlnet": []}
    with torch.inference_mode():
        for i in range(steps):
            order = (("unet", unet_only), ("unet_controlnet", with_controlnet)) if i % 2 == 0 \
                else (("unet_controlnet", with_controlnet), ("unet", unet_only))
            for name, fn in order:
                sync()
                start = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    params = {"unet": sum(p.numel() for p in unet.parameters()),
              "controlnet": sum(p.numel() for p in net.parameters())}
    return {"bench": "controlnet-cost", "device": device, "dtype": dtype, "batch": batch,
            "latent": latent, "steps": steps,
            "unet_step_s": round(med["unet"], 3),
            "unet_controlnet_step_s": round(med["unet_controlnet"], 3),
            "ratio": round(med["unet_controlnet"] / med["unet"], 4),
            "paper_ratio": 1.34, "params": params,
            "note": "first steps include allocator warm-up; interleaved to share it fairly"}


class _PeakRss:
    """Samples this process' resident set size in a thread (Linux /proc, else psutil)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm", "rb") as handle:
                return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            import psutil  # optional fallback off Linux
            return psutil.Process().memory_info().rss

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())
        return False


def _exponent(pixels: Sequence[float], values: Sequence[float]) -> float:
    x = np.log(np.asarray(pixels, float))
    y = np.log(np.asarray(values, float))
    return float(np.polyfit(x, y, 1)[0])


def bench_scaling(sizes: Sequence[int] = (256, 512, 1024, 2048), steps: int = 4,
                  repeats: int = 3, tiny_root: Optional[str] = None,
                  device: str = "cpu", threads: Optional[int] = 1) -> Dict[str, Any]:
    """Time and peak RSS of the engine at growing output sizes (tiny model, one control).

    Two series: ``default`` (generate at native scale, resize back) and ``hires``
    (plus the img2img pass at up to 2x the work size, VAE tiling where the engine
    turns it on)."""
    from shared.messages import ControlUnit, GenerateRequest

    _set_threads(threads)
    engine = _tiny_engine(tiny_root, device)
    ctx = NullContext()
    out: Dict[str, Any] = {"bench": "scaling", "steps": steps, "repeats": repeats,
                           "sizes": list(sizes)}
    for series, hires in (("default", False), ("hires", True)):
        rows = []
        for side in sizes:
            control = _control_image(side, side)
            request = GenerateRequest(width=side, height=side, prompt="a red coat", seed=1,
                                      steps=steps, base_model="tiny-sd15", hires=hires,
                                      controls=(ControlUnit(condition="lineart", image=0),))
            engine.generate(request, {0: control}, ctx)  # warm-up at this size
            times = []
            with _PeakRss() as rss:
                base = rss.rss()
                for _ in range(repeats):
                    start = time.perf_counter()
                    engine.generate(request, {0: control}, ctx)
                    times.append(time.perf_counter() - start)
            plan = engine.last_plan
            rows.append({"side": side, "pixels": side * side,
                         "time_s": round(statistics.median(times), 4),
                         "peak_rss_mb": round(rss.peak / 2**20, 1),
                         "peak_rss_growth_mb": round((rss.peak - base) / 2**20, 1),
                         "work_size": list(plan.work),
                         "hires_size": list(plan.hires) if plan.hires else None,
                         "vae_tiling": bool(plan.first.vae_tiling or (
                             plan.hires is not None))})
        out[series] = rows
        out[f"{series}_time_exponent"] = round(
            _exponent([r["pixels"] for r in rows], [r["time_s"] for r in rows]), 3)
        growth = [max(r["peak_rss_growth_mb"], 0.1) for r in rows]
        out[f"{series}_rss_growth_exponent"] = round(
            _exponent([r["pixels"] for r in rows], growth), 3)
    out["goal_time_exponent"] = 1.1
    engine.close()
    return out


BENCHES = {"engine": bench_engine, "controlnet-cost": bench_controlnet_cost,
           "scaling": bench_scaling}


def run(name: str, **options) -> Dict[str, Any]:
    """Run the benchmark called ``name`` (engine | controlnet-cost | scaling)."""
    try:
        fn = BENCHES[name]
    except KeyError:
        raise ValueError(f"unknown engine benchmark {name!r}; choose one of "
                         f"{', '.join(BENCHES)}") from None
    return fn(**{k: v for k, v in options.items() if v is not None})


if __name__ == "__main__":  # pragma: no cover - manual runs
    import json
    import sys

    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else "engine"), sort_keys=True))
