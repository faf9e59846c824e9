"""Edit mode: an instruction (the prompt) applied to a layer (``init_image``), within a
selection (``mask_image``, optional), with up to three further pictures
(``edit_references``).  The base must be an edit model (``Resolved.edit``, read from its
files: FLUX.1 Kontext's ``model_index.json``), else :class:`~shared.errors.EditModelNeeded`
naming the edit models.

* Without a selection the pass is ``edit``: ``FluxKontextPipeline`` generates the whole
  layer from noise with the picture as its context.
* With a selection the pass is ``edit_inpaint`` over the selection's region (as inpaint
  plans it): ``FluxKontextInpaintPipeline`` with the region as ``image``, the selection as
  ``mask_image`` and the context as ``image_reference``; the engine's inpaint compose pastes
  the selected pixels only, so every pixel outside the selection stays bit-identical.
* **References**: Kontext reads one context image.  With references, the layer and each
  reference (scaled to the layer's height) are stitched side by side into that one image,
  as ComfyUI's Kontext workflows do; the output keeps the layer's size.
* The request's ``strength`` and ``hires`` are not used (the edit regenerates what it
  covers, at the work size); control units are :class:`~shared.errors.Unsupported` (there
  are no Kontext ControlNet pipelines).

Flux.2 Klein edits with its own pipelines (:mod:`.dit_klein`): the layer and up to three
references go to ``Flux2KleinPipeline`` as a list of images; control units are allowed
there and become further references with an instruction.

* Qwen-Image-Edit bases run edit mode their own way (several pictures natively on
  Edit-Plus): :mod:`.qwen_edit`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence

import numpy as np
from PIL import Image as PILImage

from shared.errors import EditModelNeeded, Unsupported

from ...imaging import to_array
from ..catalogue import EDIT_BASES, TINY_EDIT_BASES, Resolved
from ..families import REFERENCE_CONTROLS
from .geometry import Pass, resize, rgb_on_white

EDIT_KINDS = ("edit", "edit_inpaint")  # the passes of edit mode (see the module docstring)


def check_edit(request, base: Resolved) -> None:
    """Typed errors for an edit request this base cannot run (before anything loads)."""
    if request.mode != "edit":
        return
    if not base.edit:
        models = ", ".join([*dict.fromkeys(EDIT_BASES.values()), *sorted(TINY_EDIT_BASES)])
        raise EditModelNeeded(
            f"Edit mode needs an edit model as the base; {base.name!r} is not one (its files "
            f"name no edit pipeline). Pick an edit model ({models}), or use img2img / inpaint "
            f"with this base.", field="base_model")
    if any(unit.weight > 0 for unit in request.controls) and \
            base.family not in REFERENCE_CONTROLS:  # Klein: units become references
        raise Unsupported(
            "Edit mode takes no control units (diffusers has no ControlNet pipeline for "
            "FLUX.1 Kontext or Qwen-Image-Edit): turn the units off, or describe the "
            "change in the instruction.",
            field="controls")


def edit_kind(request) -> str:
    """The first pass's kind: ``edit_inpaint`` within a selection, else ``edit``."""
    return "edit_inpaint" if request.mask_image is not None else "edit"


def reference_arrays(request, fetch: Callable[[int, str], Any]) -> List[np.ndarray]:
    """The further pictures of an edit request, RGB8 on white, in the request's order
    (``fetch(slot, field)``: the slot's image, or a typed error)."""
    return [rgb_on_white(to_array(fetch(slot, "edit_references")))
            for slot in request.edit_references]


def context_image(init: np.ndarray, references: Sequence[np.ndarray],
                  multiple: int) -> PILImage.Image:
    """The one context picture: the layer, then each reference at the layer's height (its
    width a multiple of ``multiple``), side by side."""
    h = init.shape[0]
    parts = [init]
    for ref in references:
        rh, rw = ref.shape[:2]
        width = max(multiple, int(round(rw * h / rh / multiple)) * multiple)
        parts.append(resize(ref, width, h))
    return PILImage.fromarray(np.ascontiguousarray(np.concatenate(parts, axis=1)))


def edit_kwargs(p: Pass, multiple: int) -> Dict[str, Any]:
    """The Kontext pipeline's image arguments for an edit pass (sizes already multiples of
    ``multiple``: no resizing to Kontext's preferred resolutions)."""
    context = context_image(p.init, p.references, multiple)
    # max_area: Kontext scales the output to this area (default 1024 x 1024): the work size's
    common = dict(_auto_resize=False, max_area=p.size[0] * p.size[1])
    if p.kind == "edit":
        return dict(common, image=context)
    return dict(common, image=PILImage.fromarray(p.init), mask_image=PILImage.fromarray(p.mask),
                image_reference=context, strength=1.0)
