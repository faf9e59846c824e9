"""``controlcanvas bench lora-cost``: what unfused LoRAs cost per denoising step, and what
fusing would cost and change, on an SD1.5-sized UNet with random weights.

The engine keeps LoRAs unfused (see :mod:`backend.engines.diffusers.lora`); a fused LoRA
costs nothing per step (the weights are merged: the same operations as the bare UNet),
but every change of the LoRA set then costs a fuse and an unfuse, and unfusing does not
give the weights back bit for bit.  This bench gives the three figures that decision
rests on: the per-step ratio of 1 and 2 unfused LoRAs to none (interleaved), the seconds
of one fuse + unfuse of both, and the largest weight change a fuse + unfuse leaves.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Dict, Optional

# What kohya's LoRA trainer adapts in each transformer block of the UNet.
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
           "ff.net.2"]


def bench_lora_cost(steps: int = 5, batch: int = 2, latent: Optional[int] = None,
                    rank: int = 32, dtype: Optional[str] = None,
                    device: Optional[str] = None) -> Dict[str, Any]:
    """Per-step UNet time with 0, 1 and 2 unfused rank-``rank`` LoRAs; fuse/unfuse cost.
    Default: CUDA in fp16 at a 64² latent (512 px) when there is a GPU, else the CPU in
    fp32 at 32² (256 px)."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    cuda = torch.cuda.is_available()
    device = device or ("cuda" if cuda else "cpu")
    dtype = dtype or ("fp16" if device.startswith("cuda") else "fp32")
    latent = latent or (64 if device.startswith("cuda") else 32)

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=latent, cross_attention_dim=768,
                                attention_head_dim=8).eval()
    for name in ("a", "b"):
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS),
                         adapter_name=name)
    with torch.no_grad():
        for key, param in unet.named_parameters():
            if "lora_B" in key:
                param.normal_(0.0, 0.01)  # a trained LoRA is not zero
    unet.to(device=device, dtype=torch_dtype)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 4, latent, latent, generator=g).to(device, torch_dtype)
    text = torch.randn(batch, 77, 768, generator=g).to(device, torch_dtype)
    t = torch.tensor(500, device=device)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    settings = {"none": [], "one": ["a"], "two": ["a", "b"]}
    times: Dict[str, list] = {name: [] for name in settings}
    cpu: Dict[str, list] = {name: [] for name in settings}  # less hurt by a busy machine
    with torch.inference_mode():
        unet(sample, t, encoder_hidden_states=text)  # warm-up
        for i in range(steps):
            names = list(settings) if i % 2 == 0 else list(reversed(list(settings)))
            for name in names:
                if settings[name]:
                    unet.enable_lora()
                    unet.set_adapters(settings[name], [1.0] * len(settings[name]))
                else:
                    unet.disable_lora()
                sync()
                start, start_cpu = time.perf_counter(), time.process_time()
                unet(sample, t, encoder_hidden_states=text)
                sync()
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}

    weights = {k: p.detach().clone() for k, p in unet.named_parameters()
               if "base_layer.weight" in k}
    unet.enable_lora()
    unet.set_adapters(["a", "b"], [1.0, 1.0])
    sync()
    start = time.perf_counter()
    unet.fuse_lora(adapter_names=["a", "b"])
    sync()
    fuse_s = time.perf_counter() - start
    start = time.perf_counter()
    unet.unfuse_lora()
    sync()
    unfuse_s = time.perf_counter() - start
    drift = max(float((p.detach() - weights[k]).abs().max()) for k, p in unet.named_parameters()
                if k in weights)
    adapter_params = sum(p.numel() for k, p in unet.named_parameters() if ".a." in k)
    return {"bench": "lora-cost", "device": device, "dtype": dtype, "batch": batch,
            "latent": latent, "rank": rank, "steps": steps, "targets": TARGETS,
            "unet_step_s": round(med["none"], 4),
            "one_lora_step_s": round(med["one"], 4), "two_loras_step_s": round(med["two"], 4),
            "ratio_one": round(med["one"] / med["none"], 4),
            "ratio_two": round(med["two"] / med["none"], 4),
            "ratio_one_cpu_time": round(med_cpu["one"] / med_cpu["none"], 4),
            "ratio_two_cpu_time": round(med_cpu["two"] / med_cpu["none"], 4),
            "fuse_two_s": round(fuse_s, 4), "unfuse_two_s": round(unfuse_s, 4),
            "weights_changed_by_fuse_unfuse": drift,
            "lora_params": adapter_params,
            "note": "a fused LoRA runs the bare UNet's operations (ratio 1 per step) but "
                    "costs fuse + unfuse at every change of the LoRA set, and unfusing "
                    "leaves the weights changed by weights_changed_by_fuse_unfuse"}
