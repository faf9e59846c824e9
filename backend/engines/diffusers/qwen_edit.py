"""Edit mode on Qwen-Image-Edit (see :mod:`.edit` for the mode, :mod:`.dit_qwen` for the
family).  An edit base is told by its ``model_index.json`` (:data:`EDIT_CLASSES`):

* **Qwen-Image-Edit** (``QwenImageEditPipeline``) reads one picture: with references, the
  layer and the references are stitched side by side into it (as for FLUX.1 Kontext,
  :func:`.edit.context_image`).
* **Qwen-Image-Edit-Plus** (2509 and later, ``QwenImageEditPlusPipeline``) reads several:
  the layer, then each reference, natively ("Picture 1", "Picture 2", ... to its encoder).
* **A selection** without references runs ``QwenImageEditInpaintPipeline`` on the
  selection's region (the layer as its picture, the selection as its mask); with
  references, the base's edit pipeline over the region.  Either way the engine's inpaint
  compose pastes the selected pixels only: every pixel outside stays bit-identical.

What differs from text-to-image Qwen-Image:

* **The prompt is encoded with the pictures** (the Qwen2.5-VL encoder sees them through
  its processor): the pipelines get the texts, not cached embeddings.
* **Sizes**: diffusers' edit pipelines scale every picture they VAE-encode to a 1024 x 1024
  area (the inpaint one also its output).  Here that area is the pass's work size (the
  layer at exactly the work size, a reference at its own aspect with that area), so the
  output matches the plan and a small work size stays cheap; the picture shown to the
  encoder keeps diffusers' 384 x 384 area.  diffusers reads that area inside the call: it
  runs with the modules' ``calculate_dimensions`` wrapped (:func:`work_area`, one call at
  a time, nested calls allowed).
* **The processor**: ``Qwen2VLProcessor`` needs torchvision for its video half; without
  torchvision the base gets :class:`PictureProcessor` (the same processor without video:
  the pipelines pass pictures only) built from the base's ``processor/`` files.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

from diffusers import (QwenImageEditInpaintPipeline, QwenImageEditPipeline,
                       QwenImageEditPlusPipeline)
from diffusers.pipelines.qwenimage import (pipeline_qwenimage_edit,
                                           pipeline_qwenimage_edit_inpaint,
                                           pipeline_qwenimage_edit_plus)
from PIL import Image as PILImage
from transformers import Qwen2VLProcessor

from ..catalogue import Resolved
from .edit import context_image
from .geometry import Pass

# model_index classes of Qwen edit bases -> the pipeline an edit without a selection runs
EDIT_CLASSES: Dict[str, type] = {
    "QwenImageEditPipeline": QwenImageEditPipeline,
    "QwenImageEditInpaintPipeline": QwenImageEditPipeline,
    "QwenImageEditPlusPipeline": QwenImageEditPlusPipeline,
}
PIPELINES = (QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImageEditInpaintPipeline)
DIFFUSERS_AREA = 1024 * 1024  # the area diffusers' edit pipelines scale pictures to
_MODULES = (pipeline_qwenimage_edit, pipeline_qwenimage_edit_inpaint,
            pipeline_qwenimage_edit_plus)
_LOCK = threading.RLock()


class PictureProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without its video processor (which transformers cannot build
    without torchvision); the edit pipelines never pass videos."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


@lru_cache(maxsize=32)
def edit_class(path: str) -> Optional[type]:
    """The edit pipeline of the base folder at ``path`` (None: not a Qwen edit base)."""
    try:
        index = json.loads((Path(path) / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return EDIT_CLASSES.get(str(index.get("_class_name", "")))


def base_components(resolved: Resolved) -> Dict[str, Any]:
    """What a Qwen edit base is loaded with beyond its folder: without torchvision, its
    processor (see the module docstring)."""
    if importlib.util.find_spec("torchvision") is not None:
        return {}
    from transformers import AutoTokenizer, Qwen2VLImageProcessor

    folder = Path(resolved.path) / "processor"
    return dict(processor=PictureProcessor(
        image_processor=Qwen2VLImageProcessor.from_pretrained(folder),
        tokenizer=AutoTokenizer.from_pretrained(folder), video_processor=None))


def edit_pipeline(kind: str, base: Resolved, request) -> type:
    """The pipeline of an edit pass (``edit`` / ``edit_inpaint``) on ``base``."""
    if kind == "edit_inpaint" and not request.edit_references:
        return QwenImageEditInpaintPipeline
    return edit_class(base.path) or QwenImageEditPipeline


def edit_kwargs(p: Pass, pipe, multiple: int) -> Dict[str, Any]:
    """The pictures of an edit pass, for the pipeline ``pipe`` runs it with."""
    layer = PILImage.fromarray(p.init)
    if isinstance(pipe, QwenImageEditInpaintPipeline):
        return dict(image=layer, mask_image=PILImage.fromarray(p.mask), strength=1.0)
    if isinstance(pipe, QwenImageEditPlusPipeline):
        return dict(image=[layer, *(PILImage.fromarray(r) for r in p.references)])
    return dict(image=context_image(p.init, p.references, multiple))


@contextlib.contextmanager
def work_area(size: Tuple[int, int]) -> Iterator[None]:
    """diffusers' Qwen edit pipelines, for this call, scale the pictures they VAE-encode
    (and the inpaint one its output) to the work size's area: the layer to the work size
    itself (see the module docstring)."""
    with _LOCK:
        saved = [m.calculate_dimensions for m in _MODULES]
        try:
            for module, original in zip(_MODULES, saved):
                module.calculate_dimensions = _sized(original, size)
            yield
        finally:
            for module, original in zip(_MODULES, saved):
                module.calculate_dimensions = original


def _sized(original, size: Tuple[int, int]):
    w, h = size

    def calculate_dimensions(target_area, ratio):
        found = original(target_area, ratio)
        if target_area != DIFFUSERS_AREA:  # the encoder's picture (384 x 384) as diffusers
            return found
        if abs(ratio - w / h) < 1e-6:
            return (w, h, *found[2:])
        scaled = original(w * h, ratio)
        return (max(32, scaled[0]), max(32, scaled[1]), *found[2:])

    return calculate_dimensions
