"""The tiny Qwen-Image-Edit stack (``tiny-qwen-edit``): the tiny Qwen-Image transformer and
VAE of :mod:`backend.engines.tiny_qwen` (Qwen-Image-Edit is the Qwen-Image transformer
trained to edit) in a folder of its own whose ``model_index.json`` names
``QwenImageEditPlusPipeline`` (Qwen-Image-Edit-2509: the layer and up to three further
pictures), which :func:`backend.engines.families.detect_base_folder` reads to call it an
edit base.

What the edit pipelines add: they show the pictures to the Qwen2.5-VL text encoder
through its processor.  So the text encoder here is tiny_qwen's, built with Qwen's vision
tokens in the tokenizer (its vision tower: one block), and ``processor/`` holds a
``Qwen2VLProcessor``'s files (the tokenizer and a ``Qwen2VLImageProcessor`` capped at
:data:`MAX_PIXELS`, so a picture is a few tokens).  Random weights, for tests and
benchmarks; built offline on first use from the tiny Qwen-Image folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

NAME = "tiny-qwen-edit"
PIPELINE = "QwenImageEditPlusPipeline"
VERSION = "tiny-qwen-edit-v1"
SEED = 20253
MAX_PIXELS = 56 * 56  # the image processor's cap: at most 4 x 4 patches, 4 tokens a picture


def edit_dir(root: Optional[Path] = None) -> Path:
    from . import tiny

    return (root or tiny.cache_root()) / "models" / VERSION


def ensure_edit(root: Optional[Path] = None) -> Path:
    """The tiny Qwen-Image-Edit folder, made on first use (atomic) from tiny Qwen-Image."""
    from . import tiny

    folder = edit_dir(root)
    if tiny.is_built(folder):
        return folder
    qwen = tiny.ensure_tiny("qwen", root)

    def fill(tmp: Path) -> None:
        shutil.copytree(qwen, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            "controlnets", "text_encoder", "tokenizer"))
        with tiny.quiet_progress_bars():
            _text_parts(tmp, list(tiny._bytes_to_unicode().values()))

    return tiny.build_once(folder, fill)


def _text_parts(folder: Path, byte_tokens) -> None:
    """The tokenizer with vision tokens, the text encoder that reads pictures, the
    processor, and the model_index naming the edit pipeline."""
    import torch
    from transformers import Qwen2VLImageProcessorPil

    from .tiny_qwen import MODEL_INDEX, VISION_TOKENS, _text_encoder
    from .tiny_zimage import _tokenizer

    tokenizer = _tokenizer(folder / "tokenizer", byte_tokens)
    tokenizer.add_tokens(list(VISION_TOKENS), special_tokens=True)
    tokenizer.save_pretrained(folder / "tokenizer")
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        _text_encoder(tokenizer, vision_tokens=True).save_pretrained(folder / "text_encoder")
    # processor/ as the real repos hold it: the image processor's config beside the
    # tokenizer (Qwen2VLProcessor itself cannot be built without torchvision: .qwen_edit)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=MAX_PIXELS).save_pretrained(
        folder / "processor")
    tokenizer.save_pretrained(folder / "processor")
    index = dict(MODEL_INDEX, _class_name=PIPELINE,
                 processor=["transformers", "Qwen2VLProcessor"])
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    (folder / "README.txt").write_text(
        f"ControlCanvas tiny Qwen-Image-Edit model ({NAME}): the tiny Qwen-Image stack's "
        f"random weights as an edit base, with a text encoder that reads pictures, built "
        f"locally by backend/engines/tiny_qwen_edit.py for tests and benchmarks. Not a "
        f"trained model.\n", encoding="utf-8")
    (folder / ".complete").write_text(VERSION, encoding="utf-8")
