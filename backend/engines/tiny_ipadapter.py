"""Tiny IP-Adapters for the tiny SD1.5, SDXL and Flux stacks (:mod:`.tiny`, :mod:`.tiny_dit`),
built locally.

Model hubs are out of reach in tests and the offline demo, so this module builds, from a
fixed torch seed, what ``h94/IP-Adapter`` ships for a real base, sized for the tiny UNet:

* ``ip-adapter.safetensors``: the original IP-Adapter layout that diffusers'
  ``load_ip_adapter`` reads - ``image_proj.proj.*`` / ``image_proj.norm.*`` (the plain
  adapter's image projection: one CLIP image embedding -> 4 text-like tokens) and
  ``ip_adapter.<k>.to_k_ip.weight`` / ``to_v_ip.weight`` for the k-th cross-attention of
  the UNet (k = 1, 3, 5, ... in the UNet's attention order, as the original files count);
* ``ip-adapter-plus.safetensors`` and ``ip-adapter-plus-face.safetensors``: IP-Adapter
  Plus's layout (the face model is a plus model trained on faces): the Resampler image
  projection ``image_proj.latents`` / ``proj_in`` / ``proj_out`` / ``norm_out`` /
  ``layers.<i>.0.{norm1,norm2,to_q,to_kv,to_out}`` / ``layers.<i>.1.{0,1,3}`` (read from
  the encoder's penultimate hidden states, :data:`PLUS_TOKENS` tokens out), which diffusers'
  ``_convert_ip_adapter_image_proj_to_diffusers`` turns into ``IPAdapterPlusImageProjection``,
  and the same ``ip_adapter.<k>.to_k_ip`` / ``to_v_ip`` weights;
* Flux (``tiny-flux``): ``ip_adapter.safetensors`` in XLabs-AI/flux-ip-adapter's layout,
  which diffusers' ``FluxIPAdapterMixin.load_ip_adapter`` reads -
  ``ip_adapter_proj_model.proj.*`` / ``norm.*`` (one image embedding -> 4 tokens of the
  transformer's joint attention width) and
  ``double_blocks.<i>.processor.ip_adapter_double_stream_{k,v}_proj.{weight,bias}`` for
  each double-stream block (the single-stream blocks take no reference);
* ``image_encoder/``: a tiny ``CLIPVisionModelWithProjection`` (32-pixel images) and its
  ``CLIPImageProcessor`` config (``preprocessor_config.json``).

Random weights: a reference changes the picture, but not as a trained adapter would.
Built once per family into the cache folder next to the tiny stack, keyed by
:data:`VERSION` (separate from ``tiny.VERSION``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from . import tiny

log = logging.getLogger(__name__)

VERSION = "tiny-ipadapter-v2"
SEED = 20251
WEIGHT_NAME = "ip-adapter.safetensors"
ENCODER = "image_encoder"
IMAGE_SIZE = 32
EMBED_DIM = 16  # the tiny CLIP vision projection width
TOKENS = 4      # the plain adapter's image tokens
PLUS_NAME = "ip-adapter-plus.safetensors"
FACE_NAME = "ip-adapter-plus-face.safetensors"
FLUX_WEIGHT_NAME = "ip_adapter.safetensors"  # XLabs-AI/flux-ip-adapter's file name
HIDDEN = 32       # the tiny CLIP vision hidden size (what a plus adapter reads)
PLUS_TOKENS = 8   # a plus adapter's image tokens (the Resampler's queries)
PLUS_DEPTH = 4    # diffusers' IPAdapterPlusImageProjection always has 4 blocks
HEAD_DIM = 64     # ... of heads of 64 (heads = to_q rows // 64)


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
    denoiser = "transformer" if family == "flux" else "unet"
    unet_folder = tiny.ensure_tiny(family, root) / denoiser

    def fill(tmp: Path) -> None:
        with tiny.quiet_progress_bars():
            build(tmp, unet_folder, family)

    tiny.build_once(folder, fill, built=is_built)
    log.info("built the tiny %s IP-Adapter in %s", family, folder)
    return folder


def build(folder: Path, unet_folder: Path, family: str = "sd15") -> Path:
    """Build the adapter for the UNet (Flux: the transformer) saved in ``unet_folder`` into
    ``folder``."""
    import torch
    from safetensors.torch import save_file
    from transformers import (CLIPImageProcessor, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    folder.mkdir(parents=True, exist_ok=True)
    cpu_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(SEED)
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            image_size=IMAGE_SIZE, patch_size=8, projection_dim=EMBED_DIM))
        generator = torch.Generator().manual_seed(SEED + 1)

        def rand(*shape, scale=0.3):
            return (torch.randn(*shape, generator=generator) * scale).contiguous()

        files = _flux_files(rand, unet_folder) if family == "flux" else \
            _unet_files(rand, unet_folder)
    finally:
        torch.random.set_rng_state(cpu_state)
    for name, tensors in files.items():
        save_file(tensors, str(folder / name))
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


def _unet_files(rand, unet_folder: Path):
    """The plain, plus and plus-face adapters' tensors for the UNet in ``unet_folder``."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(unet_folder, local_files_only=True)
    cross = int(unet.config.cross_attention_dim)
    widths = list(_cross_attention_widths(unet))
    files = {}
    for name, projection in ((WEIGHT_NAME, _plain_projection),
                             (PLUS_NAME, _plus_projection), (FACE_NAME, _plus_projection)):
        files[name] = dict(projection(rand, cross), **_ip_layers(rand, widths, cross))
    return files


def _flux_files(rand, transformer_folder: Path):
    """XLabs-AI/flux-ip-adapter's tensors for the Flux transformer in ``transformer_folder``
    (read from its config: double blocks, inner width, joint attention width)."""
    import json

    import torch

    config = json.loads((transformer_folder / "config.json").read_text(encoding="utf-8"))
    joint = int(config["joint_attention_dim"])
    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    tensors = {"ip_adapter_proj_model.proj.weight": rand(TOKENS * joint, EMBED_DIM),
               "ip_adapter_proj_model.proj.bias": rand(TOKENS * joint, scale=0.1),
               "ip_adapter_proj_model.norm.weight": torch.ones(joint),
               "ip_adapter_proj_model.norm.bias": torch.zeros(joint)}
    for i in range(int(config["num_layers"])):
        for kv in ("k", "v"):
            name = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj"
            tensors[f"{name}.weight"] = rand(inner, joint)
            tensors[f"{name}.bias"] = rand(inner, scale=0.1)
    return {FLUX_WEIGHT_NAME: tensors}


def _plain_projection(rand, cross: int):
    """The plain adapter's image projection: one image embedding -> :data:`TOKENS` tokens."""
    import torch

    return {"image_proj.proj.weight": rand(TOKENS * cross, EMBED_DIM),
            "image_proj.proj.bias": rand(TOKENS * cross, scale=0.1),
            "image_proj.norm.weight": torch.ones(cross),
            "image_proj.norm.bias": torch.zeros(cross)}


def _plus_projection(rand, cross: int):
    """IP-Adapter Plus's Resampler in the original file layout (one head of
    :data:`HEAD_DIM`, feed-forward x4, no biases inside the blocks)."""
    import torch

    out = {"image_proj.latents": rand(1, PLUS_TOKENS, HIDDEN, scale=HIDDEN ** -0.5),
           "image_proj.proj_in.weight": rand(HIDDEN, HIDDEN),
           "image_proj.proj_in.bias": rand(HIDDEN, scale=0.1),
           "image_proj.proj_out.weight": rand(cross, HIDDEN),
           "image_proj.proj_out.bias": rand(cross, scale=0.1),
           "image_proj.norm_out.weight": torch.ones(cross),
           "image_proj.norm_out.bias": torch.zeros(cross)}
    for i in range(PLUS_DEPTH):
        block = f"image_proj.layers.{i}"
        for norm in (f"{block}.0.norm1", f"{block}.0.norm2", f"{block}.1.0"):
            out[f"{norm}.weight"] = torch.ones(HIDDEN)
            out[f"{norm}.bias"] = torch.zeros(HIDDEN)
        out.update({f"{block}.0.to_q.weight": rand(HEAD_DIM, HIDDEN),
                    f"{block}.0.to_kv.weight": rand(2 * HEAD_DIM, HIDDEN),
                    f"{block}.0.to_out.weight": rand(HIDDEN, HEAD_DIM),
                    f"{block}.1.1.weight": rand(4 * HIDDEN, HIDDEN),
                    f"{block}.1.3.weight": rand(HIDDEN, 4 * HIDDEN)})
    return out


def _ip_layers(rand, widths, cross: int):
    """``ip_adapter.<k>.to_k_ip`` / ``to_v_ip`` for each cross-attention (k = 1, 3, ...)."""
    out = {}
    for n, hidden in enumerate(widths):
        key = 2 * n + 1
        out[f"ip_adapter.{key}.to_k_ip.weight"] = rand(hidden, cross)
        out[f"ip_adapter.{key}.to_v_ip.weight"] = rand(hidden, cross)
    return out


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
