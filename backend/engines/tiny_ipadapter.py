"""A tiny IP-Adapter for the tiny SD1.5 and SDXL stacks (:mod:`.tiny`), built locally.

Model hubs are out of reach in tests and the offline demo, so this module builds, from a
fixed torch seed, what ``h94/IP-Adapter`` ships for a real base, sized for the tiny UNet:

* ``ip-adapter.safetensors``: the original IP-Adapter layout that diffusers'
  ``load_ip_adapter`` reads - ``image_proj.proj.*`` / ``image_proj.norm.*`` (the plain
  adapter's image projection: one CLIP image embedding -> 4 text-like tokens) and
  ``ip_adapter.<k>.to_k_ip.weight`` / ``to_v_ip.weight`` for the k-th cross-attention of
  the UNet (k = 1, 3, 5, ... in the UNet's attention order, as the original files count);
* ``image_encoder/``: a tiny ``CLIPVisionModelWithProjection`` (32-pixel images) and its
  ``CLIPImageProcessor`` config (``preprocessor_config.json``).

Random weights: a reference changes the picture, but not as a trained adapter would.
Built once per family into the cache folder next to the tiny stack, keyed by
:data:`VERSION` (separate from ``tiny.VERSION``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from . import tiny

log = logging.getLogger(__name__)

VERSION = "tiny-ipadapter-v1"
SEED = 20251
WEIGHT_NAME = "ip-adapter.safetensors"
ENCODER = "image_encoder"
IMAGE_SIZE = 32
EMBED_DIM = 16  # the tiny CLIP vision projection width
TOKENS = 4      # the plain adapter's image tokens


def adapter_dir(family: str, root: Optional[Path] = None) -> Path:
    return (root or tiny.cache_root()) / "models" / f"{VERSION}-{family}"


def is_built(folder: Path) -> bool:
    return (folder / WEIGHT_NAME).is_file() and (folder / ".complete").is_file()


def ensure_tiny_adapter(family: str = "sd15", root: Optional[Path] = None) -> Path:
    """The folder of the tiny IP-Adapter for the tiny ``family`` stack, built on first use
    (atomic, offline)."""
    folder = adapter_dir(family, root)
    if is_built(folder):
        return folder
    unet_folder = tiny.ensure_tiny(family, root) / "unet"
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        with tiny.quiet_progress_bars():
            build(tmp, unet_folder)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race, or a stale partial folder
            if not is_built(folder):
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("built the tiny %s IP-Adapter in %s", family, folder)
    return folder


def build(folder: Path, unet_folder: Path) -> Path:
    """Build the adapter for the UNet saved in ``unet_folder`` into ``folder``."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import (CLIPImageProcessor, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    folder.mkdir(parents=True, exist_ok=True)
    unet = UNet2DConditionModel.from_pretrained(unet_folder, local_files_only=True)
    cross = int(unet.config.cross_attention_dim)
    cpu_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(SEED)
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            image_size=IMAGE_SIZE, patch_size=8, projection_dim=EMBED_DIM))
        generator = torch.Generator().manual_seed(SEED + 1)

        def rand(*shape, scale=0.3):
            return (torch.randn(*shape, generator=generator) * scale).contiguous()

        tensors = {
            "image_proj.proj.weight": rand(TOKENS * cross, EMBED_DIM),
            "image_proj.proj.bias": rand(TOKENS * cross, scale=0.1),
            "image_proj.norm.weight": torch.ones(cross),
            "image_proj.norm.bias": torch.zeros(cross),
        }
        key = 1
        for hidden in _cross_attention_widths(unet):
            tensors[f"ip_adapter.{key}.to_k_ip.weight"] = rand(hidden, cross)
            tensors[f"ip_adapter.{key}.to_v_ip.weight"] = rand(hidden, cross)
            key += 2
    finally:
        torch.random.set_rng_state(cpu_state)
    save_file(tensors, str(folder / WEIGHT_NAME))
    encoder.save_pretrained(folder / ENCODER)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
                       ).save_pretrained(folder / ENCODER)
    (folder / "README.txt").write_text(
        f"ControlCanvas tiny IP-Adapter ({VERSION}): random weights built locally by "
        f"backend/engines/tiny_ipadapter.py for tests. Not a trained model.\n",
        encoding="utf-8")
    (folder / ".complete").write_text(VERSION, encoding="utf-8")
    return folder


def _cross_attention_widths(unet):
    """The width of each cross-attention, in ``attn_processors`` order: the order and the
    widths ``load_ip_adapter`` reads the weights in (from the block's channels)."""
    channels = list(unet.config.block_out_channels)
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            yield channels[-1]
        elif name.startswith("up_blocks"):
            yield list(reversed(channels))[int(name[len("up_blocks.")])]
        else:
            yield channels[int(name[len("down_blocks.")])]
