"""The tiny Qwen-Image stack, built locally like :mod:`backend.engines.tiny_dit`'s Flux and
SD3 stacks (random weights, fixed seed, no hub):

* a QwenImageTransformer2DModel (two blocks, no guidance embedding, as Qwen-Image),
* an AutoencoderKLQwenImage (Qwen-Image's causal 3D VAE: 16 latent channels, 8x),
* a tiny Qwen2.5-VL text encoder (``Qwen2_5_VLForConditionalGeneration`` from a
  transformers config: Qwen-Image reads its last hidden states) and the byte-level Qwen2
  tokenizer of :mod:`backend.engines.tiny_zimage` (Qwen's chat-template tokens),
* FlowMatchEulerDiscreteScheduler with Qwen-Image's dynamic shift,
* two QwenImageControlNetModels: ``union`` (InstantX's union model: one model for canny,
  soft edge, depth and pose, the condition read from the image) and ``inpaint`` (InstantX's
  inpainting ControlNet: 4 extra condition channels, the mask beside the image latents).

Keyed by :data:`VERSION`, built by :mod:`backend.engines.tiny` (which hands over the byte
symbols); addressable as base ``tiny-qwen``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Sequence, Tuple

VERSION = "tiny-qwen-v1"
FAMILY = "qwen"
SEED = 20252
TEXT_WIDTH = 32       # the Qwen2.5-VL text model's hidden size (the joint attention width)
LATENT = 16           # latent channels (Qwen-Image's VAE z_dim)
UNION = "union"
INPAINT = "inpaint"
# The tiny ControlNets: name -> the conditions it serves (the union: families.QWEN_UNION).
CONTROLNETS: Dict[str, Tuple[str, ...]] = {
    UNION: ("canny", "lineart", "lineart_anime", "mlsd", "scribble", "softedge", "depth",
            "openpose"),
    INPAINT: ("inpaint",),
}


# Qwen2.5-VL's picture tokens: a picture's patches go between the first two, as the third.
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")


def controlnet_for(condition: str) -> str:
    """The tiny ControlNet folder for ``condition`` (KeyError: none serves it)."""
    for name, conditions in CONTROLNETS.items():
        if condition in conditions:
            return name
    raise KeyError(condition)


def _text_encoder(tokenizer, vision_tokens: bool = False):
    """The tiny Qwen2.5-VL; ``vision_tokens``: the tokenizer has Qwen's vision tokens
    (the edit stack, :mod:`backend.engines.tiny_qwen_edit`, feeds it pictures)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    vision = len(tokenizer)  # no image reaches Qwen-Image's text encoder: ids past the vocab
    start = end = image = vision
    if vision_tokens:
        start, end, image = (tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS)
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": TEXT_WIDTH, "intermediate_size": 37,
                     "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": len(tokenizer),
                     "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default",
                                      "type": "default"},
                     "rope_theta": 1_000_000.0, "bos_token_id": None, "eos_token_id": pad,
                     "pad_token_id": pad},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16,
                       "num_heads": 2, "out_hidden_size": TEXT_WIDTH},
        hidden_size=TEXT_WIDTH, vocab_size=len(tokenizer), vision_start_token_id=start,
        vision_end_token_id=end, image_token_id=image, vision_token_id=vision)
    return Qwen2_5_VLForConditionalGeneration(config)


def _vae():
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(base_dim=16, z_dim=LATENT, dim_mult=[1, 2, 2, 2],
                                  num_res_blocks=1, temperal_downsample=[False, True, True],
                                  latents_mean=[0.0] * LATENT, latents_std=[1.0] * LATENT)


def _parts(folder: Path, byte_tokens: Sequence[str]) -> Dict[str, Any]:
    import torch
    from diffusers import QwenImageControlNetModel, QwenImageTransformer2DModel

    from .tiny_dit import _wake
    from .tiny_zimage import _tokenizer

    config = dict(patch_size=2, in_channels=4 * LATENT, out_channels=LATENT, num_layers=2,
                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_WIDTH,
                  axes_dims_rope=(4, 6, 6))
    transformer = QwenImageTransformer2DModel(**config, guidance_embeds=False)
    tokenizer = _tokenizer(folder / "tokenizer", byte_tokens)
    parts: Dict[str, Any] = {"transformer": transformer, "vae": _vae(),
                             "text_encoder": _text_encoder(tokenizer)}
    generator = torch.Generator().manual_seed(SEED + 1)
    nets = {}
    for name in CONTROLNETS:
        extra = 4 if name == INPAINT else 0  # the mask, 2x2-packed beside the image latents
        net = QwenImageControlNetModel(**dict(config, num_layers=1),
                                       extra_condition_channels=extra)
        net.load_state_dict({k: v for k, v in transformer.state_dict().items()
                             if not k.startswith("transformer_blocks.1.")}, strict=False)
        _wake(net, ("controlnet_blocks", "controlnet_x_embedder"), generator)
        nets[name] = net
    parts["controlnets"] = nets
    return parts


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
        max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
        time_shift_type="exponential")


MODEL_INDEX: Dict[str, Any] = {
    "_class_name": "QwenImagePipeline", "_diffusers_version": "0.42.0",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "QwenImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLQwenImage"],
}


def build(folder: Path, byte_tokens: Sequence[str]) -> Path:
    """Build the tiny Qwen-Image stack into ``folder`` (deterministic, offline) with a
    tokenizer over ``byte_tokens`` (the byte-level alphabet, :mod:`backend.engines.tiny`)."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        parts = _parts(folder, byte_tokens)
        for name, net in parts.pop("controlnets").items():
            net.save_pretrained(folder / "controlnets" / name)
        for name, model in parts.items():
            model.save_pretrained(folder / name)
        _scheduler().save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2),
                                             encoding="utf-8")
    (folder / "README.txt").write_text(
        f"ControlCanvas tiny qwen model ({VERSION}): random weights built locally by "
        f"backend/engines/tiny_qwen.py for tests and benchmarks. Not a trained model.\n",
        encoding="utf-8")
    (folder / ".complete").write_text(VERSION, encoding="utf-8")
    return folder
