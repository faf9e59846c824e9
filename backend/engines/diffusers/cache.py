"""Loaded models: what a base or ControlNet entry holds, what it weighs, and the memory
budget the engine's LRU keeps them within."""

from __future__ import annotations

import gc
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict

import torch
from diffusers import ControlNetModel

from ..catalogue import Resolved

def module_bytes(*modules) -> int:
    total = 0
    for module in modules:
        if isinstance(module, torch.nn.Module):
            total += sum(p.numel() * p.element_size() for p in module.parameters())
            total += sum(b.numel() * b.element_size() for b in module.buffers())
    return total


def disk_bytes(path: str) -> int:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    total = 0
    for root, _, files in os.walk(p):
        for name in files:
            if name.endswith((".safetensors", ".bin", ".ckpt")):
                total += (Path(root) / name).stat().st_size
    return total


@dataclass
class BaseEntry:
    resolved: Resolved
    pipe: Any                                   # the txt2img pipeline loaded from disk
    family: str
    native: int
    scheduler_config: Dict[str, Any]
    nbytes: int
    pipes: Dict[type, Any] = field(default_factory=dict)
    schedulers: Dict[str, Any] = field(default_factory=dict)  # sampler -> scheduler (reused:
    offload_owner: Any = None                                  # set_timesteps resets state)
    vae_fp32: bool = False  # the VAE is kept in fp32 (acceleration.vae_in_fp32)
    loras: Any = None  # lora.LoraAdapters: the LoRAs loaded into this base (made on first use)
    references: Any = None  # ipadapter.ReferenceAdapters: its IP-Adapters (made on first use)
    prompts: Any = field(default_factory=OrderedDict)  # reuse.prompt_kwargs' embeddings
    nested_pipes: Dict[type, Any] = field(default_factory=dict)  # for jobs run in a pause
    loading: str = "gpu"  # fit.CHOICES: all on the GPU, model or sequential CPU offload


@dataclass
class NetEntry:
    model: ControlNetModel
    nbytes: int


_OOM_TEXTS = ("out of memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed")


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's out-of-memory error, or a library's (cuBLAS, cuDNN) failing allocation."""
    if isinstance(err, torch.OutOfMemoryError):  # == torch.cuda.OutOfMemoryError
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(t in text for t in _OOM_TEXTS)


def default_budget(device: torch.device, offload: bool) -> int:
    if device.type == "cuda" and not offload:
        try:
            return int(torch.cuda.get_device_properties(device).total_memory * 0.9)
        except Exception:  # noqa: BLE001
            pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.5)
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
