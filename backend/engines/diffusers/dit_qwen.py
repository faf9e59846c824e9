"""Qwen-Image (Qwen/Qwen-Image) as a transformer family (see :mod:`.dit`): :data:`QWEN`,
listed in :mod:`.dit_families`.  What differs from Flux / SD3:

* **Pipelines**: ``QwenImage{,Img2Img,Inpaint}Pipeline``; with units
  ``QwenImageControlNetPipeline`` (txt2img) and ``QwenImageControlNetInpaintPipeline``
  (inpaint with one ``inpaint`` unit: InstantX's inpainting ControlNet, whose condition is
  the picture and the selection; it VAE-encodes the masked picture with torch's global
  generator, so the call runs in an RNG forked and seeded with the job's seed).  diffusers
  has no Qwen-Image ControlNet img2img pipeline: img2img with units is
  :class:`~shared.errors.Unsupported` (as SD3), the hires pass refines without them.
* **Guidance**: Qwen-Image has no distilled guidance; ``cfg`` is its true classifier-free
  guidance (``true_cfg_scale``), which its pipelines run only with a negative prompt: an
  empty one is sent as ``" "`` (as the model card does), so cfg > 1 always guides.
* **Text**: the Qwen2.5-VL encoder's last hidden states and their attention mask
  (``prompt_embeds`` / ``prompt_embeds_mask``), cached like the other families'.
* **ControlNets**: ``QwenImageControlNetModel`` / ``QwenImageMultiControlNetModel``.  They
  have no control-mode input: InstantX's union model reads which condition it is from the
  image, and serves what it was trained on (canny, soft edge, depth, pose:
  :data:`backend.engines.families.QWEN_UNION_MODES` maps our condition names onto those);
  any other condition is :class:`~shared.errors.UnsupportedCondition` naming what serves it.
  diffusers' multi-ControlNet runs one model with several images: several units must share
  one ControlNet (the union model), else :class:`~shared.errors.Unsupported`.
* **Latents**: packed 2x2 like Flux; unpacked they are 5-D (a video VAE's one frame).
* **Edit mode** (Qwen-Image-Edit / -Plus bases): :mod:`.qwen_edit`.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from diffusers import (QwenImageControlNetInpaintPipeline, QwenImageControlNetModel,
                       QwenImageControlNetPipeline, QwenImageImg2ImgPipeline,
                       QwenImageInpaintPipeline, QwenImageMultiControlNetModel,
                       QwenImagePipeline)

from ..catalogue import Resolved
from ..families import QWEN_UNION_MODES
from .cache import BaseEntry
from .dit import DitFamily
from .edit import EDIT_KINDS
from .geometry import Pass
from .qwen_edit import PIPELINES as EDIT_PIPELINES
from .qwen_edit import base_components, edit_class, edit_kwargs, edit_pipeline, work_area

# Qwen-Image's pipelines guide only with a negative prompt: the blank one its card uses.
BLANK_NEGATIVE = " "


def encode(pipe, prompt: str, negative: Optional[str], cfg: bool) -> Dict[str, Any]:
    """The prompt's (and with cfg the negative prompt's) embeddings and masks."""
    device = pipe._execution_device
    embeds, mask = pipe.encode_prompt(prompt=prompt, device=device, num_images_per_prompt=1)
    found: Dict[str, Any] = dict(prompt_embeds=embeds, prompt_embeds_mask=mask)
    if cfg:
        embeds, mask = pipe.encode_prompt(prompt=negative or BLANK_NEGATIVE, device=device,
                                          num_images_per_prompt=1)
        found.update(negative_prompt_embeds=embeds, negative_prompt_embeds_mask=mask)
    return found


class QwenFamily(DitFamily):
    """Qwen-Image, and on a Qwen-Image-Edit base edit mode (:mod:`.qwen_edit`)."""

    def base_pipeline(self, resolved: Resolved) -> Tuple[type, Dict[str, Any]]:
        cls = edit_class(resolved.path) if resolved.edit else None
        if cls is None:
            return super().base_pipeline(resolved)
        return cls, base_components(resolved)

    def pipeline_class(self, mode: str, controls: bool, request, base: Resolved) -> type:
        if mode in EDIT_KINDS:
            return edit_pipeline(mode, base, request)
        return super().pipeline_class(mode, controls, request, base)

    def call_kwargs(self, request, p: Pass, entry: BaseEntry, pipe, units, order, generator,
                    cfg: bool, stats: Dict[str, Any], cache_size: int) -> Dict[str, Any]:
        if p.kind not in EDIT_KINDS:
            return super().call_kwargs(request, p, entry, pipe, units, order, generator, cfg,
                                       stats, cache_size)
        w, h = p.size
        # the texts, not cached embeddings: the encoder reads them with the pictures
        negative = (request.negative_prompt or BLANK_NEGATIVE) if cfg else None
        return dict(edit_kwargs(p, pipe, self.multiple), prompt=request.prompt,
                    negative_prompt=negative, true_cfg_scale=request.cfg,
                    num_inference_steps=p.steps, generator=generator, height=h, width=w,
                    output_type="np")

    def run(self, pipe, kwargs: Dict[str, Any], seed: int, device):
        if not isinstance(pipe, EDIT_PIPELINES):
            return super().run(pipe, kwargs, seed, device)
        with work_area((kwargs["width"], kwargs["height"])):
            return pipe(**kwargs).images[0]


QWEN = QwenFamily(
    "qwen",
    {("txt2img", False): QwenImagePipeline, ("img2img", False): QwenImageImg2ImgPipeline,
     ("inpaint", False): QwenImageInpaintPipeline, ("txt2img", True): QwenImageControlNetPipeline,
     ("inpaint", True): QwenImageControlNetInpaintPipeline},
    QwenImageControlNetModel, QwenImageMultiControlNetModel, encode, true_cfg=True,
    union_modes=QWEN_UNION_MODES, refine_controls=False, cfg_arg="true_cfg_scale",
    blank_negative=BLANK_NEGATIVE, inpaint_net=True, one_net=True, global_rng=True)
