"""Flux.2 Klein (Black Forest Labs' FLUX.2 [klein] 4B / 9B) as a transformer family (see
:mod:`.dit`).  One model generates and edits: ``Flux2KleinPipeline`` takes a list of
reference images beside the prompt.

What differs from Flux.1:

* **Prompt**: one Qwen3 text encoder (hidden states 9, 18 and 27, stacked); cached like the
  other families'.  ``cfg`` is classifier-free guidance for the base (undistilled) models;
  the distilled 4B / 9B ignore it (``is_distilled`` in their ``model_index.json``).  When
  guidance runs, the negative prompt is used (the pipeline's default is an empty one).
* **img2img**: ``Flux2KleinPipeline`` has no init image nor strength; img2img runs
  ``Flux2KleinInpaintPipeline`` with every pixel selected (its mask blend then keeps
  nothing of the picture but the start: exactly img2img), the picture also its first
  condition image, as diffusers' Klein inpaint does.  Inpaint runs the same pipeline with
  the selection.
* **Edit mode** (:mod:`.edit`): the layer is reference image 1 and the request's further
  pictures (up to three) images 2.. of ``Flux2KleinPipeline``; within a selection the
  inpaint pipeline edits the selected region (the region its ``image``, the references
  side by side its ``image_reference``) and the engine pastes the selected pixels only.
* **No ControlNet**: as Black Forest Labs recommend for Klein, each control unit with a
  weight becomes a reference image with an instruction fitting its condition appended
  to the prompt ("Pose the people exactly as the pose skeleton in image 2.",
  :data:`INSTRUCTIONS`).  The unit's weight only says it is on, its start / end are not
  used (logged); its annotator runs as for the other families.  The ``models`` message
  lists the emulated conditions (``families.REFERENCE_CONTROLS``), and
  :func:`shared.offers.Offers.control_note` lets the plug-ins say that control is emulated.
* Latents are packed (batch, tokens, 128): previews unpack them to a grey approximation.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image as PILImage

from diffusers import Flux2KleinInpaintPipeline, Flux2KleinPipeline

from shared.errors import UnsupportedCondition

from ..catalogue import Resolved
from ..families import KLEIN_REFERENCE_CONDITIONS
from .cache import BaseEntry
from .dit import DitFamily, _rgb
from .edit import EDIT_KINDS, context_image
from .geometry import Pass, resize
from .reuse import prompt_kwargs

log = logging.getLogger(__name__)

MIN_REFERENCE_SIDE = 64  # Flux2ImageProcessor.check_image_input refuses smaller pictures
_LINES = "Use the line drawing in image {n} as the exact outlines of the picture."
INSTRUCTIONS: Dict[str, str] = {
    "canny": "Follow the edges in image {n} exactly for the composition and shapes.",
    "lineart": _LINES, "lineart_anime": _LINES, "scribble": _LINES,
    "softedge": "Follow the soft outlines in image {n} for the composition and shapes.",
    "mlsd": "Keep the straight lines of image {n} as the picture's architecture.",
    "depth": "Match the depth and spatial layout shown by the depth map in image {n}.",
    "normal": "Match the shapes and surfaces shown by the normal map in image {n}.",
    "openpose": "Pose the people exactly as the pose skeleton in image {n}.",
    "seg": "Lay out the scene following the coloured regions of the segmentation map in "
           "image {n}.",
    "tile": "Keep the composition, colours and details of image {n}, rendered sharper.",
    "shuffle": "Use the style, colours and textures of image {n}.",
}
assert set(INSTRUCTIONS) == set(KLEIN_REFERENCE_CONDITIONS)


def _encode_klein(pipe, prompt: str, negative: Optional[str], cfg: bool) -> Dict[str, Any]:
    embeds, _ = pipe.encode_prompt(prompt=prompt, device=pipe._execution_device,
                                   num_images_per_prompt=1)
    out: Dict[str, Any] = dict(prompt_embeds=embeds)
    if cfg:
        out["negative_prompt_embeds"], _ = pipe.encode_prompt(
            prompt=negative or "", device=pipe._execution_device, num_images_per_prompt=1)
    return out


def _picture(array: np.ndarray) -> PILImage.Image:
    """A reference as the Klein pipelines take it: RGB, each side at least 64 pixels."""
    h, w = array.shape[:2]
    scale = max(1.0, MIN_REFERENCE_SIDE / min(h, w))
    if scale > 1.0:
        array = resize(np.ascontiguousarray(array), int(np.ceil(w * scale)),
                       int(np.ceil(h * scale)))
    return PILImage.fromarray(np.ascontiguousarray(array))


def control_instructions(request, order: Sequence[int], first: int) -> List[str]:
    """The instruction for each unit in ``order``, its control image numbered from
    ``first`` (typed error for a condition no instruction serves)."""
    out = []
    for n, i in enumerate(order, start=first):
        condition = request.controls[i].condition
        text = INSTRUCTIONS.get(condition)
        if text is None:
            raise UnsupportedCondition(
                f"Flux.2 Klein has no ControlNet; it follows a control image given as a "
                f"reference, which works for {', '.join(KLEIN_REFERENCE_CONDITIONS)} - not "
                f"{condition!r}. Use one of those, inpaint mode for inpainting, or an SDXL or "
                f"Flux.1 base with a {condition} ControlNet.", field="condition")
        out.append(text.format(n=n))
    return out


class KleinFamily(DitFamily):
    """Klein's differences (see the module docstring) over :class:`.dit.DitFamily`."""

    def job_units(self, request, nets: Sequence, types: Sequence[Optional[int]]
                  ) -> Tuple[bool, Optional[torch.nn.Module], List[int]]:
        """No ControlNet: the units with a weight, in order, become references (a typed
        error, before any step runs, for a condition no instruction serves)."""
        order = [i for i, unit in enumerate(request.controls) if unit.weight > 0]
        control_instructions(request, order, 1)
        for i in order:
            unit = request.controls[i]
            if unit.start > 0 or unit.end < 1 or unit.weight != 1:
                log.info("Flux.2 Klein follows the %s unit as a reference image: its weight "
                         "(%g) and start / end (%g..%g) are not used", unit.condition,
                         unit.weight, unit.start, unit.end)
        return request.cfg > 1.0, None, order

    def pipeline_class(self, mode: str, controls: bool, request, base: Resolved) -> type:
        return self.pipelines[(mode, False)]  # every mode has one; units are references

    def call_kwargs(self, request, p: Pass, entry: BaseEntry, pipe, units, order, generator,
                    cfg: bool, stats: Dict[str, Any], cache_size: int) -> Dict[str, Any]:
        inpainting = p.kind in ("img2img", "inpaint", "edit_inpaint")  # the inpaint pipeline
        refs, first = self._references(p, order, inpainting)
        prompt = " ".join([request.prompt, *control_instructions(request, order, first)])
        if order:
            log.info("Flux.2 Klein has no ControlNet: %d control unit(s) run as reference "
                     "images with the instruction(s) %r", len(order),
                     prompt[len(request.prompt):].strip())
        cfg = cfg and not pipe.config.get("is_distilled", False)  # distilled: no guidance
        negative = (request.negative_prompt or None) if cfg else None
        kwargs: Dict[str, Any] = prompt_kwargs(
            pipe, entry, prompt, negative, cfg, stats, cache_size,
            encode=lambda: self.encode(pipe, prompt, negative, cfg))
        kwargs.pop("negative_prompt", None)  # the Klein pipelines take embeddings only
        w, h = p.size
        kwargs.update(num_inference_steps=p.steps, guidance_scale=request.cfg,
                      generator=generator, height=h, width=w, output_type="np")
        if not inpainting:
            kwargs["image"] = refs or None  # the layer (edit), edit references, controls
            return kwargs
        full = p.mask is None  # img2img: every pixel selected
        mask = np.full((h, w), 255, np.uint8) if full else p.mask
        kwargs.update(image=PILImage.fromarray(p.init), mask_image=PILImage.fromarray(mask),
                      strength=1.0 if p.kind in EDIT_KINDS else p.runs / p.steps)
        if refs:
            kwargs["image_reference"] = context_image(np.asarray(refs[0]),
                                                      [np.asarray(r) for r in refs[1:]],
                                                      self.multiple)
        return kwargs

    def _references(self, p: Pass, order: Sequence[int], inpainting: bool
                    ) -> Tuple[List[PILImage.Image], int]:
        """The pass's reference pictures and the number the first control image has in the
        prompt (the inpaint pipeline's condition image 1 is the picture itself, its
        references side by side image 2)."""
        refs: List[PILImage.Image] = []
        if p.kind == "edit":
            refs.append(_picture(p.init))
        if p.kind in EDIT_KINDS:
            refs += [_picture(r) for r in p.references]
        first = 2 if inpainting else len(refs) + 1
        refs += [_picture(np.asarray(_rgb(p.controls[i]))) for i in order]
        return refs, first

    def run(self, pipe, kwargs: Dict[str, Any], seed: int, device: torch.device):
        return pipe(**kwargs).images[0]

    def preview_latents(self, pipe, latents: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """The packed latents (batch, tokens, 128) as (batch, 128, h / 16, w / 16)."""
        if latents.ndim != 3:
            return latents
        w, h = size
        rows, cols = h // self.multiple, w // self.multiple
        return latents[:, :rows * cols].transpose(1, 2).reshape(
            latents.shape[0], latents.shape[2], rows, cols)


KLEIN = KleinFamily(
    "klein",
    {("txt2img", False): Flux2KleinPipeline, ("img2img", False): Flux2KleinInpaintPipeline,
     ("inpaint", False): Flux2KleinInpaintPipeline, ("edit", False): Flux2KleinPipeline,
     ("edit_inpaint", False): Flux2KleinInpaintPipeline},
    torch.nn.Module, torch.nn.Module, _encode_klein, true_cfg=True,  # no ControlNet class
    union_modes={}, refine_controls=True)
