"""Z-Image (Tongyi-MAI's Z-Image / Z-Image-Turbo) as a transformer family (see :mod:`.dit`).

What differs from Flux / SD3:

* **Prompt**: one Qwen3 text encoder; the pipeline wraps the prompt in a chat turn and reads
  variable-length embeddings (lists), cached like the other families'.
* **Guidance**: Z-Image's pipelines compute ``pos + g x (pos - neg)`` (classifier-free
  guidance runs whenever ``g > 0``), where the other families' ``cfg`` is
  ``neg + cfg x (pos - neg)``: the request's ``cfg`` becomes ``g = cfg - 1``, so ``cfg``
  means the same everywhere and ``cfg <= 1`` runs no guidance batch (Z-Image-Turbo's
  recommended setting: it is distilled for guidance 0).  The negative prompt is used when
  guidance runs.
* **ControlNet**: alibaba-pai's union ControlNet (``ZImageControlNetModel``) reads *one*
  control image and tells its kind from the picture (no control modes):
  :data:`backend.engines.families.ZIMAGE_CONDITIONS`.  So one unit with a weight at a
  time (several: :class:`~shared.errors.UnsupportedCondition` naming the Flux and SDXL
  union ControlNets, which combine units), over the whole run (no start / end window in
  the pipeline).  It runs in txt2img and inpaint (``ZImageControlNetInpaintPipeline``:
  Union 2.x reads the mask and the masked picture too; it inpaints from noise, no
  strength); diffusers has no Z-Image ControlNet img2img pipeline: img2img with a unit is
  :class:`~shared.errors.Unsupported`, and the hires pass refines without it.  The
  ControlNet shares the base transformer's embedders and refiners
  (``ZImageControlNetModel.from_transformer``), attached before every call.
* Latents are (batch, 16, h, w) as SD3's: previews read them as they are.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image as PILImage

from diffusers import (ZImageControlNetInpaintPipeline, ZImageControlNetModel,
                       ZImageControlNetPipeline, ZImageImg2ImgPipeline,
                       ZImageInpaintPipeline, ZImagePipeline)

from shared.errors import Unsupported, UnsupportedCondition

from ..catalogue import ZIMAGE_UNION, Resolved
from ..families import ZIMAGE_CONDITIONS, ZIMAGE_INPAINT_CONTROL_DIM
from .cache import BaseEntry
from .dit import DitFamily, _rgb
from .geometry import Pass
from .reuse import prompt_kwargs


def _encode_zimage(pipe, prompt: str, negative: Optional[str], cfg: bool) -> Dict[str, Any]:
    embeds, negative_embeds = pipe.encode_prompt(
        prompt=prompt, device=pipe._execution_device, do_classifier_free_guidance=cfg,
        negative_prompt=negative)
    return dict(prompt_embeds=embeds, negative_prompt_embeds=negative_embeds if cfg else None)


class ZImageFamily(DitFamily):
    """Z-Image's differences (see the module docstring) over :class:`.dit.DitFamily`."""

    def check_compatible(self, net, entry: BaseEntry) -> bool:
        ours, theirs = net.config, entry.pipe.transformer.config
        return ours.dim == theirs.dim and ours.n_heads == theirs.n_heads

    def job_units(self, request, nets: Sequence, types: Sequence[Optional[int]]
                  ) -> Tuple[bool, Optional[torch.nn.Module], List[int]]:
        cfg = request.cfg > 1.0
        order = [i for i, unit in enumerate(request.controls) if unit.weight > 0]
        if not order or not nets:
            return cfg, None, order
        if len(order) > 1:
            raise UnsupportedCondition(
                f"The Z-Image union ControlNet reads one control image at a time (got "
                f"{len(order)} units with a weight: "
                f"{', '.join(request.controls[i].condition for i in order)}). Keep one unit "
                f"on (set the others' weight to 0), or use a Flux.1 or SDXL base, whose union "
                f"ControlNets combine several units.", field="controls")
        unit = request.controls[order[0]]
        if unit.start > 0 or unit.end < 1:
            raise UnsupportedCondition(
                f"Z-Image's ControlNet pipelines run a unit over every step: set this unit's "
                f"start to 0 and end to 1 (got {unit.start:g}..{unit.end:g}).", field="start")
        net = nets[order[0]]
        if request.mode == "inpaint" and \
                net.config.control_in_dim != ZIMAGE_INPAINT_CONTROL_DIM:
            raise Unsupported(
                f"This Z-Image ControlNet reads the control image only ("
                f"{net.config.control_in_dim} channels); inpainting with a unit needs Union "
                f"2.x, which also reads the mask and the picture: `controlcanvas models "
                f"download {ZIMAGE_UNION}`, or inpaint without the unit.", field="controls")
        return cfg, net, order

    def pipeline_class(self, mode: str, controls: bool, request, base: Resolved) -> type:
        cls = self.pipelines.get((mode, controls))
        if cls is None:
            raise Unsupported(
                f"Z-Image ControlNets run in txt2img and inpaint; diffusers has no Z-Image "
                f"ControlNet {mode} pipeline. Use txt2img or inpaint, turn the units off for "
                f"{mode} (weight 0), or pick a Flux, SDXL or SD1.5 base.", field="mode")
        return cls

    def call_kwargs(self, request, p: Pass, entry: BaseEntry, pipe, units, order, generator,
                    cfg: bool, stats: Dict[str, Any], cache_size: int) -> Dict[str, Any]:
        negative = (request.negative_prompt or None) if cfg else None
        kwargs: Dict[str, Any] = prompt_kwargs(
            pipe, entry, request.prompt, negative, cfg, stats, cache_size,
            encode=lambda: self.encode(pipe, request.prompt, negative, cfg))
        w, h = p.size
        net_inpaint = units is not None and p.kind == "inpaint"  # from noise, no strength
        kwargs.update(num_inference_steps=p.runs if net_inpaint else p.steps,
                      guidance_scale=request.cfg - 1.0 if cfg else 0.0, generator=generator,
                      height=h, width=w, output_type="np")
        if p.kind != "txt2img":
            kwargs["image"] = PILImage.fromarray(p.init)
            if not net_inpaint:  # the strength that runs exactly the steps planned (.dit)
                kwargs["strength"] = p.runs / p.steps
        if p.kind == "inpaint":
            kwargs["mask_image"] = PILImage.fromarray(p.mask)
        if units is not None:
            kwargs.update(control_image=_rgb(p.controls[order[0]]),
                          controlnet_conditioning_scale=request.controls[order[0]].weight)
        return kwargs

    def run(self, pipe, kwargs: Dict[str, Any], seed: int, device: torch.device):
        """Call the pipeline, the ControlNet sharing this base's embedders and refiners."""
        net = getattr(pipe, "controlnet", None)
        if net is not None:
            ZImageControlNetModel.from_transformer(net, pipe.transformer)
        return pipe(**kwargs).images[0]


ZIMAGE = ZImageFamily(
    "zimage",
    {("txt2img", False): ZImagePipeline, ("img2img", False): ZImageImg2ImgPipeline,
     ("inpaint", False): ZImageInpaintPipeline, ("txt2img", True): ZImageControlNetPipeline,
     ("inpaint", True): ZImageControlNetInpaintPipeline},
    ZImageControlNetModel, ZImageControlNetModel, _encode_zimage, true_cfg=True,
    union_modes={condition: 0 for condition in ZIMAGE_CONDITIONS}, refine_controls=False)
