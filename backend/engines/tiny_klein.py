"""Tiny Flux.2 Klein stack (``tiny-klein``), built locally like :mod:`backend.engines.tiny_dit`'s
(random weights, fixed seed, no hub).

* a ``Flux2Transformer2DModel`` (one double-stream and one single-stream block, 32 wide; no
  guidance embedding, as Klein's),
* the tiny Qwen3 text encoder and byte-level Qwen2 tokenizer of :mod:`.tiny_zimage`, 28
  layers deep (the Klein pipeline stacks hidden states 9, 18 and 27, so the transformer
  reads 3 x 32 text channels), inside a ``Qwen3ForCausalLM`` as Klein's,
* a tiny ``AutoencoderKLFlux2`` (32 latent channels, 2x2 patches: 128 transformer channels),
* ``FlowMatchEulerDiscreteScheduler`` with dynamic shifting (the pipeline passes ``mu``).

``model_index.json`` names ``Flux2KleinPipeline`` and ``is_distilled: false`` (so classifier-
free guidance runs when cfg > 1, as Klein's base models).  Keyed by :data:`VERSION`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Sequence

VERSION = "tiny-klein-v1"
FAMILY = "klein"
NAME = "tiny-klein"
SEED = 20262
TEXT_LAYERS = 28
PIPELINE = "Flux2KleinPipeline"
TRANSFORMER = dict(patch_size=1, in_channels=128, num_layers=1, num_single_layers=1,
                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=96,
                   timestep_guidance_channels=32, mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4),
                   guidance_embeds=False)


def _vae():
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2(
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=32,
        norm_num_groups=8, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=False)


def _causal_lm(encoder):
    """The encoder inside a ``Qwen3ForCausalLM`` (the class Klein's model_index names)."""
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM(encoder.config)
    model.model = encoder
    return model


def build(folder: Path, byte_tokens: Sequence[str]) -> Path:
    """Build the tiny Klein stack into ``folder`` (deterministic, offline); ``byte_tokens`` as
    for :func:`.tiny_zimage.build`."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    from .tiny_zimage import _text_encoder, _tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        tok = _tokenizer(folder / "tokenizer", byte_tokens)
        parts: Dict[str, Any] = {
            "transformer": Flux2Transformer2DModel(**TRANSFORMER), "vae": _vae(),
            "text_encoder": _causal_lm(_text_encoder(
                len(tok), tok.convert_tokens_to_ids("<|endoftext|>"), TEXT_LAYERS))}
        for name, model in parts.items():
            model.save_pretrained(folder / name)
        FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0,
                                        use_dynamic_shifting=True).save_pretrained(
            folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(_model_index(), indent=2),
                                             encoding="utf-8")
    (folder / "README.txt").write_text(
        f"ControlCanvas tiny Flux.2 Klein model ({VERSION}): random weights built locally by "
        f"backend/engines/tiny_klein.py for tests and benchmarks. Not a trained model.\n",
        encoding="utf-8")
    (folder / ".complete").write_text(VERSION, encoding="utf-8")
    return folder


def _model_index() -> Dict[str, Any]:
    return {"_class_name": PIPELINE, "_diffusers_version": "0.42.0", "is_distilled": False,
            "vae": ["diffusers", "AutoencoderKLFlux2"],
            "transformer": ["diffusers", "Flux2Transformer2DModel"],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Qwen3ForCausalLM"],
            "tokenizer": ["transformers", "Qwen2Tokenizer"]}
