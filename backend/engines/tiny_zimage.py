"""Tiny Z-Image stack, built locally like :mod:`backend.engines.tiny_dit`'s (random weights,
fixed seed, no hub).

* a ``ZImageTransformer2DModel`` (two layers, one noise / context refiner each, 32 wide),
* a tiny ``Qwen3Model`` text encoder (the pipeline reads its second-to-last hidden state)
  with a byte-level Qwen2 tokenizer made in memory and a ChatML template (Z-Image wraps
  the prompt in a chat turn),
* the 16-channel AutoencoderKL of the tiny DiT stacks (Z-Image uses Flux's VAE),
* ``FlowMatchEulerDiscreteScheduler`` with Z-Image-Turbo's settings (shift 3, static),
* one ControlNet, ``union``: a ``ZImageControlNetModel`` shaped like alibaba-pai's
  Z-Image-Turbo-Fun-Controlnet-Union 2.1 (33 control channels: control latents, the
  mask and the masked picture's latents, so it serves txt2img and inpaint alike).

Keyed by :data:`VERSION`.  The ControlNet's zero-initialised projections get small random
values so the control image matters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Sequence, Tuple

VERSION = "tiny-zimage-v2"  # v2: the real model's RoPE lengths (v1's 64 broke longer prompts)
FAMILY = "zimage"
SEED = 20261
NATIVE_SIZE = 64
TEXT_WIDTH = 32
UNION = "union"
CONTROL_IN_DIM = 33  # 16 control latents + 1 mask + 16 masked-picture latents (Union 2.x)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokenizer(folder: Path, byte_tokens: Sequence[str]):
    """A byte-level BPE tokenizer (every byte a token, no merges) in Qwen2's class."""
    from transformers import Qwen2TokenizerFast

    vocab: Dict[str, int] = {}
    for token in byte_tokens:
        vocab.setdefault(token, len(vocab))
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Qwen2TokenizerFast(vocab=vocab, merges=[], unk_token=None,
                             pad_token="<|endoftext|>", eos_token="<|im_end|>",
                             additional_special_tokens=specials[1:], model_max_length=512)
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    tok.add_tokens(["<|endoftext|>"], special_tokens=True)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    return tok


def _text_encoder(vocab_size: int, pad: int, layers: int = 2):
    """A tiny Qwen3 text encoder (``layers`` deep: Flux.2 Klein reads layers 9, 18, 27)."""
    from transformers import Qwen3Config, Qwen3Model

    return Qwen3Model(Qwen3Config(
        vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=37,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=1024, pad_token_id=pad, tie_word_embeddings=False))


# RoPE lengths as the real model's (positions of the caption's tokens - one per byte here -
# and of the image patches must fit: 1024 text positions, 512 patches a side)
TRANSFORMER = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32,
                   n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                   cap_feat_dim=TEXT_WIDTH, axes_dims=[4, 6, 6], axes_lens=[1024, 512, 512])


def _parts(folder: Path, byte_tokens: Sequence[str]) -> Dict[str, Any]:
    import torch
    from diffusers import ZImageControlNetModel, ZImageTransformer2DModel

    from .tiny_dit import _vae, _wake

    tok = _tokenizer(folder / "tokenizer", byte_tokens)
    parts: Dict[str, Any] = {
        "transformer": ZImageTransformer2DModel(**TRANSFORMER), "vae": _vae(),
        "text_encoder": _text_encoder(len(tok), tok.convert_tokens_to_ids("<|endoftext|>"))}
    net = ZImageControlNetModel(
        control_layers_places=[0, 1], control_refiner_layers_places=[0],
        control_in_dim=CONTROL_IN_DIM, add_control_noise_refiner="control_noise_refiner",
        all_patch_size=(2,), all_f_patch_size=(1,), dim=32, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2)
    names = tuple(n for n, _ in net.named_parameters() if "after_proj" in n or
                  "before_proj" in n)
    _wake(net, names, torch.Generator().manual_seed(SEED + 1))
    parts["controlnets"] = {UNION: net}
    return parts


def build(folder: Path, byte_tokens: Sequence[str]) -> Path:
    """Build the tiny Z-Image stack into ``folder`` (deterministic, offline); its tokenizer
    has one token per byte (``byte_tokens``: GPT-2's byte-to-unicode characters, which
    :mod:`backend.engines.tiny` owns and passes)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        parts = _parts(folder, byte_tokens)
        for name, net in parts.pop("controlnets").items():
            net.save_pretrained(folder / "controlnets" / name)
        for name, model in parts.items():
            model.save_pretrained(folder / name)
        FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0,
                                        use_dynamic_shifting=False).save_pretrained(
            folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(_model_index(), indent=2),
                                             encoding="utf-8")
    (folder / "README.txt").write_text(
        f"ControlCanvas tiny Z-Image model ({VERSION}): random weights built locally by "
        f"backend/engines/tiny_zimage.py for tests and benchmarks. Not a trained model.\n",
        encoding="utf-8")
    (folder / ".complete").write_text(VERSION, encoding="utf-8")
    return folder


def _model_index() -> Dict[str, Any]:
    return {"_class_name": "ZImagePipeline", "_diffusers_version": "0.42.0",
            "vae": ["diffusers", "AutoencoderKL"],
            "transformer": ["diffusers", "ZImageTransformer2DModel"],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Qwen3Model"],
            "tokenizer": ["transformers", "Qwen2Tokenizer"]}


def controlnet_for(condition: str) -> str:
    """The tiny ControlNet folder for ``condition`` (KeyError: the union model has no mode
    for it)."""
    from .families import ZIMAGE_CONDITIONS

    if condition in ZIMAGE_CONDITIONS:
        return UNION
    raise KeyError(condition)


def served() -> Tuple[str, ...]:
    from .families import ZIMAGE_CONDITIONS

    return tuple(ZIMAGE_CONDITIONS)
