"""The embedded default model: tiny SD1.5- and SDXL-shaped stacks built locally.

``controlcanvas demo`` and the tests need a real diffusers model without a
download or a GPU.  This module builds one from a fixed torch seed: a UNet, a
VAE with SD's 8x downsampling (4 blocks, so control images are downsampled
exactly as for real models), a CLIP text encoder with a tokenizer made from an
in-memory byte-level vocabulary, a scheduler and ControlNets made with
``ControlNetModel.from_unet`` (the SDXL stack also gets a union ControlNet with xinsir's
eight ProMax control types: what the real catalogue uses for SDXL).  The ControlNets'
zero convolutions are then given
random values (see ``_perturb_zero_convs``): a fresh ControlNet has no effect at
all, and the demo should show the control image steering the picture.

The weights are random, so pictures are coloured noise shaped by the control
image.  The files are small (a few MB) and build in well under a second.

Layout of a built stack (``build(folder, "sd15")``)::

    folder/model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/
    folder/controlnets/<name>/config.json + diffusion_pytorch_model.safetensors
    (names: lines, maps; SDXL also union)

``ensure_tiny(family)`` builds once into the user cache folder, keyed by
:data:`VERSION` (bump it whenever the recipe changes), and returns the folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from shared.paths import cache_dir

log = logging.getLogger(__name__)

VERSION = "tiny-v3"
FAMILIES = ("sd15", "sdxl")
SEED = 20241
# The tiny ControlNets: one per group of conditions that look alike, so a
# multi-ControlNet request uses genuinely different networks.
CONTROLNETS: Dict[str, Tuple[str, ...]] = {
    "lines": ("lineart", "lineart_anime", "scribble", "canny", "softedge", "mlsd", "shuffle"),
    "maps": ("depth", "normal", "seg", "openpose", "tile", "inpaint"),
}
UNION = "union"  # the SDXL stack's union ControlNet: every condition it serves
UNION_CONTROL_TYPES = 8  # as xinsir's ProMax
NATIVE_SIZE = 64  # unet sample_size (8) x VAE scale factor (8)


def controlnet_for(condition: str, family: str = "sd15") -> str:
    """Name of the tiny ControlNet folder used for a condition: for SDXL the union
    ControlNet wherever it serves the condition (as the real catalogue), else one of
    ``CONTROLNETS``."""
    from . import tiny_dit, tiny_qwen, tiny_zimage
    from .families import UNION_CONTROL_TYPES as SERVED

    if family == tiny_zimage.FAMILY:
        return tiny_zimage.controlnet_for(condition)
    if family == tiny_qwen.FAMILY:
        return tiny_qwen.controlnet_for(condition)
    if family in tiny_dit.FAMILIES:
        return tiny_dit.controlnet_for(condition, family)
    if family == "sdxl" and condition in SERVED:
        return UNION
    for name, conditions in CONTROLNETS.items():
        if condition in conditions:
            return name
    raise KeyError(condition)


def cache_root() -> Path:
    """Per-user cache folder (``shared.paths.cache_dir``; override: CONTROLCANVAS_CACHE_DIR)."""
    return cache_dir()


def tiny_dir(family: str, root: Optional[Path] = None) -> Path:
    from . import tiny_dit, tiny_klein, tiny_qwen, tiny_zimage

    version = tiny_dit.VERSION if family in tiny_dit.FAMILIES else VERSION  # keyed apart
    version = tiny_zimage.VERSION if family == tiny_zimage.FAMILY else version
    version = tiny_qwen.VERSION if family == tiny_qwen.FAMILY else version
    version = tiny_klein.VERSION if family == tiny_klein.FAMILY else version
    return (root or cache_root()) / "models" / f"{version}-{family}"


def is_built(folder: Path) -> bool:
    return (folder / "model_index.json").is_file() and (folder / ".complete").is_file()


def ensure_tiny(family: str = "sd15", root: Optional[Path] = None) -> Path:
    """The folder of the tiny ``family`` stack, built on first use (atomic, offline)."""
    from . import tiny_dit, tiny_klein, tiny_qwen, tiny_zimage

    known = FAMILIES + tiny_dit.FAMILIES + (tiny_zimage.FAMILY, tiny_qwen.FAMILY,
                                              tiny_klein.FAMILY)
    if family not in known:
        raise ValueError(f"unknown tiny family {family!r}; expected one of {known}")
    folder = tiny_dir(family, root)
    if is_built(folder):
        return folder
    build_once(folder, lambda tmp: build(tmp, family))
    log.info("built the tiny %s model in %s", family, folder)
    return folder


def build_once(folder: Path, fill: Callable[[Path], Any],
               built: Callable[[Path], bool] = is_built) -> Path:
    """``folder``, unless ``built`` already: filled by ``fill(tmp)`` in a temporary folder
    beside it, then renamed into place (atomic: nobody sees a half-built folder; of two
    processes building at once, one wins; a stale partial folder is replaced).  Every tiny
    model (stacks, adapters, edit bases) is built this way."""
    if built(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        fill(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race, or a stale partial folder
            if not built(folder):
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


# -----------------------------------------------------------------------------
# Building
# -----------------------------------------------------------------------------

@contextlib.contextmanager
def quiet_progress_bars():
    """Turn off diffusers' and transformers' tqdm bars (loading/saving), then restore."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    states = [(lib, lib.is_progress_bar_enabled()) for lib in (dlog, tlog)]
    for lib, _ in states:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, enabled in states:
            if enabled:
                lib.enable_progress_bar()


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def tiny_vocab() -> Tuple[Dict[str, int], list]:
    """A byte-level CLIP vocabulary (every byte, alone and word-final) and a few merges
    (pairs, as the ``tokenizers`` BPE model takes them)."""
    chars = list(_bytes_to_unicode().values())
    vocab: Dict[str, int] = {}
    for token in ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]:
        vocab[token] = len(vocab)
    merges = []
    for a, b in [("t", "h"), ("e", "r"), ("i", "n"), ("a", "n"), ("o", "n")]:
        merged = a + b
        merges.append((a, b))
        merges.append((a, b + "</w>"))
        vocab.setdefault(merged, len(vocab))
        vocab.setdefault(merged + "</w>", len(vocab))
    return vocab, merges


def _tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    vocab, merges = tiny_vocab()
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    tok.save_pretrained(folder)
    return tok


# SDXL's second text encoder is wider than its first (1280 vs 768); so is the tiny one's,
# which is also how diffusers tells them apart in a single-file checkpoint.
TEXT_WIDTHS = {"text_encoder": 32, "text_encoder_2": 48}


def _text_config(vocab_size: int, eos: int, projection_dim: int = 32, hidden: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0, eos_token_id=eos, pad_token_id=eos, hidden_size=hidden,
        intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=vocab_size, hidden_act="gelu", projection_dim=projection_dim,
        max_position_embeddings=77)


def _perturb_zero_convs(controlnet, generator) -> None:
    """Make the control image matter in an untrained ControlNet.

    ``from_unet`` zero-initialises the output convolutions (so a fresh ControlNet has
    no effect at all) and the conditioning embedding's last conv (so the control
    image has none either); torch's default init also shrinks the signal through
    the embedding's stack of small convs.  So: He-normal weights through the
    embedding (its last conv included) and small random output convolutions."""
    import torch

    with torch.no_grad():
        emb = controlnet.controlnet_cond_embedding
        for conv in [emb.conv_in, *emb.blocks, emb.conv_out]:
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator)
                              * (2.0 / fan_in) ** 0.5)
            conv.bias.zero_()
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.3)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * 0.05)


def union_controlnet(unet, generator):
    """A tiny ``ControlNetUnionModel`` from ``unet``: ``from_unet`` with the union's
    transformer sized to the tiny UNet (its default is 320 channels, 6 control types),
    xinsir's 8 control types, and random zero convolutions and fusion projection (so each
    condition and control type matters)."""
    import torch
    from diffusers import ControlNetUnionModel

    first = ControlNetUnionModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    width = int(unet.config.block_out_channels[0])
    config = {k: v for k, v in first.config.items() if k != "_use_default_values"}
    config.update(num_control_type=UNION_CONTROL_TYPES, num_trans_channel=width,
                  num_trans_head=2, num_proj_channel=width)
    net = ControlNetUnionModel.from_config(config)
    own = net.state_dict()
    net.load_state_dict({k: v for k, v in first.state_dict().items()
                         if k in own and own[k].shape == v.shape}, strict=False)
    _perturb_zero_convs(net, generator)
    with torch.no_grad():
        proj = net.spatial_ch_projs
        proj.weight.copy_(torch.randn(proj.weight.shape, generator=generator) * 0.3)
        net.task_embedding.copy_(torch.randn(net.task_embedding.shape, generator=generator)
                                 * width ** 0.5)
    return net


def build(folder: Path, family: str = "sd15") -> Path:
    """Build the tiny ``family`` stack into ``folder`` (deterministic, offline)."""
    from . import tiny_dit, tiny_klein, tiny_qwen, tiny_zimage

    with quiet_progress_bars():
        if family == tiny_zimage.FAMILY:  # Z-Image: a Qwen tokenizer over the same bytes
            return tiny_zimage.build(Path(folder), list(_bytes_to_unicode().values()))
        if family == tiny_qwen.FAMILY:  # Qwen-Image: the same
            return tiny_qwen.build(Path(folder), list(_bytes_to_unicode().values()))
        if family == tiny_klein.FAMILY:  # Klein: the same Qwen tokenizer and text encoder
            return tiny_klein.build(Path(folder), list(_bytes_to_unicode().values()))
        if family in tiny_dit.FAMILIES:  # the transformer stacks (Flux, SD3), our tiny CLIP
            return tiny_dit.build(Path(folder), family, _tokenizer, _text_config)
        return _build(Path(folder), family)


def _build(folder: Path, family: str) -> Path:
    import torch
    from diffusers import (AutoencoderKL, ControlNetModel, DPMSolverMultistepScheduler,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder.mkdir(parents=True, exist_ok=True)
    sdxl = family == "sdxl"
    cpu_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(SEED)
        unet_kwargs = dict(
            sample_size=NATIVE_SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), norm_num_groups=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
        if sdxl:
            unet_kwargs.update(cross_attention_dim=sum(TEXT_WIDTHS.values()),
                               attention_head_dim=(2, 4),
                               use_linear_projection=True, addition_embed_type="text_time",
                               addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
                               projection_class_embeddings_input_dim=6 * 8 + 32)
        else:
            unet_kwargs.update(cross_attention_dim=32, attention_head_dim=8)
        unet = UNet2DConditionModel(**unet_kwargs)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
            block_out_channels=(8, 16, 16, 16), layers_per_block=1, sample_size=32,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4)
        tokenizer = _tokenizer(folder / "tokenizer")
        eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        text_encoder = CLIPTextModel(_text_config(len(tokenizer), eos))
        if sdxl:
            _tokenizer(folder / "tokenizer_2")
            text_encoder_2 = CLIPTextModelWithProjection(
                _text_config(len(tokenizer), eos, hidden=TEXT_WIDTHS["text_encoder_2"]))
        generator = torch.Generator().manual_seed(SEED + 1)
        controlnets = {}
        for index, name in enumerate(CONTROLNETS):
            net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
            _perturb_zero_convs(net, generator)
            controlnets[name] = net
        if sdxl:
            controlnets[UNION] = union_controlnet(unet, generator)
    finally:
        torch.random.set_rng_state(cpu_state)

    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading" if sdxl else
        "linspace", algorithm_type="dpmsolver++", use_karras_sigmas=True)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    scheduler.save_pretrained(folder / "scheduler")
    for name, net in controlnets.items():
        net.save_pretrained(folder / "controlnets" / name)
    if sdxl:
        text_encoder_2.save_pretrained(folder / "text_encoder_2")
    index = _model_index(sdxl)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    (folder / "README.txt").write_text(
        f"ControlCanvas embedded default model ({VERSION}, {family}): random weights built "
        f"locally by backend/engines/tiny.py for the demo and tests. Not a trained model.\n",
        encoding="utf-8")
    (folder / ".complete").write_text(VERSION, encoding="utf-8")
    return folder


def _model_index(sdxl: bool) -> Dict[str, Any]:
    """model_index.json of the tiny SD1.5 or SDXL pipeline (a declarative table)."""
    if sdxl:
        return {
            "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.0",
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
            "force_zeros_for_empty_prompt": True,
        }
    return {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.0",
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }


# -----------------------------------------------------------------------------
# Tiny T2I-Adapters (kept apart from the stacks: their own version key)
# -----------------------------------------------------------------------------

ADAPTER_VERSION = "tiny-t2i-v1"
# Sized for the tiny UNets (down blocks: 32 channels then 64, one 2x downsampling between
# them; the UNet adds an adapter feature after a plain down block and inside a cross-attention
# one, before its downsampler): both features at latent / 2.  SD1.5's layout
# (``full_adapter``) with one level feeds the first down block; SDXL's (``full_adapter_xl``)
# feeds both.  ``in_channels`` 1: a grey control image, as TencentARC's canny and sketch
# adapters take.
ADAPTER_CONFIGS: Dict[str, Dict[str, Any]] = {
    "sd15": dict(in_channels=1, channels=[32], num_res_blocks=1, downscale_factor=16,
                 adapter_type="full_adapter"),
    "sdxl": dict(in_channels=1, channels=[32, 64], num_res_blocks=1, downscale_factor=16,
                 adapter_type="full_adapter_xl"),
}


def tiny_adapter_dir(family: str, root: Optional[Path] = None) -> Path:
    return (root or cache_root()) / "models" / f"{ADAPTER_VERSION}-{family}"


def ensure_tiny_adapter(family: str = "sd15", root: Optional[Path] = None) -> Path:
    """The folder of the tiny T2I-Adapter for the tiny ``family`` stack (a diffusers
    ``T2IAdapter``: config.json + weights), built on first use from a fixed seed."""
    if family not in ADAPTER_CONFIGS:
        raise ValueError(f"unknown tiny family {family!r}; expected one of {FAMILIES}")
    def fill(tmp: Path) -> None:
        with quiet_progress_bars():
            _build_adapter(tmp, family)

    return build_once(tiny_adapter_dir(family, root), fill,
                      built=lambda folder: (folder / ".complete").is_file())


def _build_adapter(folder: Path, family: str) -> None:
    import torch
    from diffusers import T2IAdapter

    cpu_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(SEED + (3 if family == "sdxl" else 2))
        adapter = T2IAdapter(**ADAPTER_CONFIGS[family])
    finally:
        torch.random.set_rng_state(cpu_state)
    adapter.save_pretrained(folder)
    (folder / ".complete").write_text(ADAPTER_VERSION, encoding="utf-8")
