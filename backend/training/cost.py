"""What a ControlNet costs to train, next to fine-tuning the UNet alone.

The ControlNet paper (sec. 3.3) reports, for Stable Diffusion on one A100, that
training with a ControlNet takes about 23 % more GPU memory and 34 % more time
per iteration than fine-tuning Stable Diffusion without one.  This measures the
same comparison here: one UNet configuration, one batch, random weights and data,

* ``controlnet``: base UNet frozen, ControlNet (``from_unet``) trained with AdamW;
  gradients still flow back through the frozen UNet's decoder;
* ``unet``: the whole UNet trained with AdamW, no ControlNet;

timed step by step in one process, interleaved (C, U, C, U, ...), medians compared.
Peak memory per step = the bytes alive before the step (weights, optimizer
state) + the highest extra allocation during one step: CUDA's allocator
statistics on a GPU, the PyTorch profiler's per-op CPU allocations otherwise.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, UNet2DConditionModel

# UNet shapes to compare on.  "small" keeps Stable Diffusion 1.5's layout (four levels,
# two layers per block, cross-attention on the first three) at 1/5 of its widths.
PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(unet=dict(block_out_channels=(32, 64, 64), layers_per_block=1,
                           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                             "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                           "UpBlock2D"),
                           cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32),
                 latent=16, vae_factor=4, tokens=77, batch=32, cond_channels=(16, 32, 64)),
    "small": dict(unet=dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2,
                            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                            cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32),
                  latent=32, vae_factor=8, tokens=77, batch=2, cond_channels=(16, 32, 96, 256)),
}


def _bytes(*tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _static_bytes(modules, optimizer) -> int:
    tensors = [p for m in modules for p in m.parameters()]
    tensors += [p.grad for m in modules for p in m.parameters()]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    return _bytes(*tensors)


def _peak_extra(step: Callable[[], None], device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def build(preset: str, seed: int = 0) -> Tuple[UNet2DConditionModel, Dict[str, Any]]:
    spec = PRESETS[preset]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=spec["latent"], in_channels=4, out_channels=4,
                                **spec["unet"])
    return unet, spec


def measure_train_cost(preset: str = "small", batch: int = 0, repeats: int = 6,
                       device: str = "cpu", seed: int = 0) -> Dict[str, Any]:
    """Seconds and peak bytes per training step: ControlNet vs UNet fine-tuning."""
    dev = torch.device(device)
    unet_frozen, spec = build(preset, seed)
    batch = batch or spec["batch"]
    unet_tuned = UNet2DConditionModel.from_config(unet_frozen.config)
    unet_tuned.load_state_dict(unet_frozen.state_dict())
    controlnet = ControlNetModel.from_unet(unet_frozen,
                                           conditioning_embedding_out_channels=spec["cond_channels"])
    for module in (unet_frozen, unet_tuned, controlnet):
        module.to(dev)
    unet_frozen.requires_grad_(False)
    opt_c = torch.optim.AdamW(controlnet.parameters(), lr=1e-5)
    opt_u = torch.optim.AdamW(unet_tuned.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(seed)
    size = spec["latent"]
    latents = torch.randn(batch, 4, size, size, generator=g).to(dev)
    noise = torch.randn(latents.shape, generator=g).to(dev)
    hidden = torch.randn(batch, spec["tokens"], spec["unet"]["cross_attention_dim"],
                         generator=g).to(dev)
    cond = torch.rand(batch, 3, size * spec["vae_factor"], size * spec["vae_factor"],
                      generator=g).to(dev)
    timesteps = torch.randint(0, 1000, (batch,), generator=g).to(dev)

    def step_controlnet() -> None:
        down, mid = controlnet(latents, timesteps, encoder_hidden_states=hidden,
                               controlnet_cond=cond, return_dict=False)
        pred = unet_frozen(latents, timesteps, encoder_hidden_states=hidden,
                           down_block_additional_residuals=down,
                           mid_block_additional_residual=mid, return_dict=False)[0]
        F.mse_loss(pred, noise).backward()
        opt_c.step()
        opt_c.zero_grad(set_to_none=True)

    def step_unet() -> None:
        pred = unet_tuned(latents, timesteps, encoder_hidden_states=hidden, return_dict=False)[0]
        F.mse_loss(pred, noise).backward()
        opt_u.step()
        opt_u.zero_grad(set_to_none=True)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    step_controlnet(), step_unet()  # warm-up; also creates the optimizer state
    times: Dict[str, list] = {"controlnet": [], "unet": []}
    for _ in range(repeats):
        for name, fn in (("controlnet", step_controlnet), ("unet", step_unet)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    static_c = _static_bytes([controlnet, unet_frozen], opt_c)
    static_u = _static_bytes([unet_tuned], opt_u)
    extra_c, extra_u = _peak_extra(step_controlnet, dev), _peak_extra(step_unet, dev)
    peak_c, peak_u = static_c + extra_c, static_u + extra_u
    med_c, med_u = statistics.median(times["controlnet"]), statistics.median(times["unet"])
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {
        "preset": preset, "batch": batch, "latent_side": size, "device": str(dev),
        "repeats": repeats, "threads": torch.get_num_threads(),
        "unet_params": count(unet_tuned), "controlnet_params": count(controlnet),
        "controlnet_step_s": round(med_c, 4), "unet_step_s": round(med_u, 4),
        "controlnet_step_min_s": round(min(times["controlnet"]), 4),
        "unet_step_min_s": round(min(times["unet"]), 4),
        "controlnet_peak_mb": round(peak_c / 2**20, 1), "unet_peak_mb": round(peak_u / 2**20, 1),
        "controlnet_static_mb": round(static_c / 2**20, 1),
        "unet_static_mb": round(static_u / 2**20, 1),
        "controlnet_step_extra_mb": round(extra_c / 2**20, 1),
        "unet_step_extra_mb": round(extra_u / 2**20, 1),
        "ratio": round(med_c / med_u, 4), "memory_ratio": round(peak_c / peak_u, 4),
        "paper_ratio": 1.34, "paper_memory_ratio": 1.23,
        "memory_method": "cuda max_memory_allocated" if dev.type == "cuda" else
        "weights + optimizer state + peak of per-op CPU allocations (torch.profiler)",
    }
