"""Tiny transformer (DiT) stacks: Flux.1- and SD3.5-shaped, built locally like
:mod:`backend.engines.tiny`'s UNet stacks (random weights, fixed seed, no hub).

* ``flux``: a FluxTransformer2DModel (one double and one single block, distilled guidance
  embedding like FLUX.1-dev), a 16-channel AutoencoderKL with SD's 8x downsampling and
  Flux's scaling/shift factors, a tiny CLIPTextModel (the pooled text) and a tiny
  T5EncoderModel, both with tokenizers made in memory, FlowMatchEulerDiscreteScheduler
  with Flux's dynamic shifting, and two ControlNets: ``lines`` (an InstantX-style classic
  FluxControlNetModel) and ``union`` (the InstantX / Shakker union model with its 10 control
  modes).
* ``sd3``: an SD3Transformer2DModel, two tiny CLIPTextModelWithProjection, a tiny T5, the
  same 16-channel VAE, FlowMatchEulerDiscreteScheduler (shift 3) and SD3ControlNetModels:
  ``lines`` and ``maps`` (classic) and ``inpaint`` (the inpainting ControlNet's 17-channel
  condition: image latents + mask, as alimama's SD3 inpainting ControlNet).

Each is keyed by :data:`VERSION` (separate from the UNet stacks' ``tiny.VERSION``).  The
ControlNets' zero-initialised outputs get small random values so the control image matters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Tuple

VERSION = "tiny-dit-v1"
FAMILIES = ("flux", "sd3")
SEED = 20251
NATIVE_SIZE = 64
TEXT_WIDTH = 32      # CLIP hidden size (and pooled width)
T5_WIDTH = 32        # T5 d_model (the joint attention width)
FLUX_UNION_MODES = 10  # InstantX's union model: canny, tile, depth, blur, pose, gray, lq, ...
# The ControlNets of each tiny stack: name -> conditions it serves (the union: see
# backend.engines.diffusers.dit's control-mode table).
CONTROLNETS: Dict[str, Dict[str, Tuple[str, ...]]] = {
    "flux": {"lines": ("lineart", "lineart_anime", "scribble", "canny", "softedge", "mlsd")},
    "sd3": {"lines": ("lineart", "lineart_anime", "scribble", "canny", "softedge", "mlsd"),
            "maps": ("depth", "tile"), "inpaint": ("inpaint",)},
}
FLUX_UNION = "union"


def controlnet_for(condition: str, family: str) -> str:
    """The tiny ControlNet folder for ``condition`` (KeyError: none serves it).  Flux: the
    union model wherever it has a mode for the condition (as the real catalogue)."""
    if family == "flux":
        from .families import FLUX_UNION_MODES as SERVED

        if condition in SERVED:
            return FLUX_UNION
    for name, conditions in CONTROLNETS[family].items():
        if condition in conditions:
            return name
    raise KeyError(condition)


def _t5(folder: Path):
    """A tiny T5 encoder and its tokenizer made in memory: a unigram vocabulary of single
    characters (printable ASCII and T5's word-start mark)."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(chr(c), -3.0) for c in range(33, 127)]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)
    tokenizer.save_pretrained(folder / "tokenizer_t5")
    config = T5Config(vocab_size=len(pieces), d_model=T5_WIDTH, d_kv=8, d_ff=37, num_layers=1,
                      num_heads=4, relative_attention_num_buckets=8, pad_token_id=0,
                      eos_token_id=1, decoder_start_token_id=0)
    return tokenizer, T5EncoderModel(config)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, norm_num_groups=8,
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
        use_post_quant_conv=False)


def _wake(module, names, generator, scale: float = 0.3) -> None:
    """Small random values for the zero-initialised parameters named ``names``."""
    import torch

    with torch.no_grad():
        for name, param in module.named_parameters():
            if any(name.startswith(n) for n in names):
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def _flux(folder: Path, clip_tokenizer, clip_config) -> Dict[str, Any]:
    import torch
    from diffusers import FluxControlNetModel, FluxTransformer2DModel
    from transformers import CLIPTextModel

    config = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5_WIDTH,
                  pooled_projection_dim=TEXT_WIDTH, guidance_embeds=True,
                  axes_dims_rope=(4, 6, 6))
    transformer = FluxTransformer2DModel(**config)
    clip = clip_tokenizer(folder / "tokenizer")
    eos = clip.convert_tokens_to_ids("<|endoftext|>")
    parts = {"transformer": transformer, "vae": _vae(),
             "text_encoder": CLIPTextModel(clip_config(len(clip), eos))}
    _, parts["text_encoder_2"] = _t5(folder)
    (folder / "tokenizer_t5").rename(folder / "tokenizer_2")
    generator = torch.Generator().manual_seed(SEED + 1)
    nets = {}
    for name, modes in (("lines", None), (FLUX_UNION, FLUX_UNION_MODES)):
        net = FluxControlNetModel(**config, num_mode=modes)
        net.load_state_dict(transformer.state_dict(), strict=False)
        _wake(net, ("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder",
                    "controlnet_mode_embedder"), generator)
        nets[name] = net
    parts["controlnets"] = nets
    return parts


def _sd3(folder: Path, clip_tokenizer, clip_config) -> Dict[str, Any]:
    import torch
    from diffusers import SD3ControlNetModel, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    config = dict(sample_size=NATIVE_SIZE // 8, patch_size=2, in_channels=16, num_layers=2,
                  attention_head_dim=8, num_attention_heads=4, joint_attention_dim=T5_WIDTH,
                  caption_projection_dim=32, pooled_projection_dim=2 * TEXT_WIDTH,
                  out_channels=16, pos_embed_max_size=16)
    transformer = SD3Transformer2DModel(**config)
    clip = clip_tokenizer(folder / "tokenizer")
    clip_tokenizer(folder / "tokenizer_2")
    eos = clip.convert_tokens_to_ids("<|endoftext|>")
    parts = {"transformer": transformer, "vae": _vae()}
    for name in ("text_encoder", "text_encoder_2"):
        parts[name] = CLIPTextModelWithProjection(clip_config(len(clip), eos))
    _, parts["text_encoder_3"] = _t5(folder)
    (folder / "tokenizer_t5").rename(folder / "tokenizer_3")
    generator = torch.Generator().manual_seed(SEED + 2)
    nets = {}
    net_config = {k: v for k, v in config.items() if k != "out_channels"}
    for name in CONTROLNETS["sd3"]:
        extra = 1 if name == "inpaint" else 0  # the mask beside the image latents
        net = SD3ControlNetModel(**dict(net_config, num_layers=1),
                                 extra_conditioning_channels=extra)
        net.load_state_dict({k: v for k, v in transformer.state_dict().items()
                             if not k.startswith("transformer_blocks.1.")}, strict=False)
        _wake(net, ("controlnet_blocks", "pos_embed_input"), generator)
        nets[name] = net
    parts["controlnets"] = nets
    return parts


def _scheduler(family: str):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if family == "flux":
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
            max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def build(folder: Path, family: str, clip_tokenizer, clip_config) -> Path:
    """Build the tiny ``family`` DiT stack into ``folder`` (deterministic, offline) with the
    UNet stacks' tiny CLIP (``clip_tokenizer(folder)``, ``clip_config(vocab_size, eos)``:
    :mod:`backend.engines.tiny` owns them and calls this)."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        maker = _flux if family == "flux" else _sd3
        parts = maker(folder, clip_tokenizer, clip_config)
        for name, net in parts.pop("controlnets").items():
            net.save_pretrained(folder / "controlnets" / name)
        for name, model in parts.items():
            model.save_pretrained(folder / name)
        _scheduler(family).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(_model_index(family), indent=2),
                                             encoding="utf-8")
    (folder / "README.txt").write_text(
        f"ControlCanvas tiny {family} model ({VERSION}): random weights built locally by "
        f"backend/engines/tiny_dit.py for tests and benchmarks. Not a trained model.\n",
        encoding="utf-8")
    (folder / ".complete").write_text(VERSION, encoding="utf-8")
    return folder


def _model_index(family: str) -> Dict[str, Any]:
    common = {"_diffusers_version": "0.42.0", "vae": ["diffusers", "AutoencoderKL"],
              "transformer": ["diffusers", f"{'Flux' if family == 'flux' else 'SD3'}"
                                           f"Transformer2DModel"],
              "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
              "tokenizer": ["transformers", "CLIPTokenizer"]}
    if family == "flux":
        return dict(common, _class_name="FluxPipeline",
                    text_encoder=["transformers", "CLIPTextModel"],
                    text_encoder_2=["transformers", "T5EncoderModel"],
                    tokenizer_2=["transformers", "T5TokenizerFast"],
                    image_encoder=[None, None], feature_extractor=[None, None])
    return dict(common, _class_name="StableDiffusion3Pipeline",
                text_encoder=["transformers", "CLIPTextModelWithProjection"],
                text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                text_encoder_3=["transformers", "T5EncoderModel"],
                tokenizer_2=["transformers", "CLIPTokenizer"],
                tokenizer_3=["transformers", "T5TokenizerFast"],
                image_encoder=[None, None], feature_extractor=[None, None])
