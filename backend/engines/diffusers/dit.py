"""Transformer (DiT) families: Flux.1, Stable Diffusion 3 / 3.5 and Qwen-Image.

The engine (:mod:`.engine`) plans, composes, caches and reports the same way for every
family; what differs for a transformer base is here, one :class:`DitFamily` per family
(:data:`FLUX`, :data:`SD3`); :mod:`.dit_families` lists every family (Z-Image's lives in
:mod:`.dit_zimage`, Qwen-Image's in :mod:`.dit_qwen`), and the engine asks its
``dit_family`` whether a base is one.

What both share:

* **Latents** have 16 channels; sizes are multiples of 16 (the VAE's 8x, then 2x2 patches:
  the engine rounds its work sizes with :attr:`DitFamily.multiple`).
* **img2img / inpaint strength**: these pipelines run ``ceil(steps x strength)`` steps where
  SD's run ``int(steps x strength)``; they get the strength that runs exactly the steps
  the engine planned (``runs / steps``, which is also the noise level SD's start at).
* **Scheduler**: the model's own flow-matching scheduler (``FlowMatchEulerDiscreteScheduler``
  from its ``scheduler/`` config, with Flux's resolution-dependent shift); the request's
  sampler names the SD samplers and is not used (logged once per base).
* **Control units**: always one ``*MultiControlNetModel`` with one entry per unit that has
  a weight (the same union model may serve several units).  A unit at weight 0 is not run
  at all (the Flux ControlNet pipelines VAE-encode each control image with the job's
  generator, which would move the seed), so weight 0 is exactly no control.  Only the
  "balanced" control mode exists here: "prompt" / "control" is
  :class:`~shared.errors.UnsupportedCondition` naming "balanced".
* **Cancel** before every transformer block of the base and the ControlNets (see
  :func:`.pipelines.cancel_points`), **previews** from the unpacked latents (no TAESD for
  these families: the linear approximation's grey), prompt embeddings cached as for the
  UNet families (:func:`.reuse.prompt_kwargs`).
* **Fast path**: the models keep their own attention processors (the SD ones would break
  joint attention); ``compile`` compiles the transformer.  FLUX.1's weights are bf16: on
  CUDA ``dtype = "bf16"`` is the safe choice (in fp16 diffusers clips the activations that
  would overflow; NaN pixels would be counted and logged by the engine).
* **LoRAs** go through :mod:`.lora` (diffusers' Flux / SD3 LoRA loaders, on the
  transformer; strength 0 is none, as for the UNet families).

Flux.1:

* ``cfg`` is Flux's distilled **guidance** (``guidance_scale``; FLUX.1-dev reads it,
  schnell has no guidance embedding and ignores it); no classifier-free guidance batch
  runs, so the **negative prompt is not used** (logged; true CFG would double the cost).
* ControlNets: a classic ``FluxControlNetModel`` (InstantX / XLabs style) per condition, or
  the InstantX / Shakker-Labs **union** model (``num_mode``) with a control mode per unit:
  :data:`backend.engines.families.FLUX_UNION_MODES` (edges -> canny, tile, depth,
  openpose -> pose); other conditions are :class:`~shared.errors.UnsupportedCondition`
  naming what serves them.

FLUX.1 Tools (Canny / Depth [dev]): a Flux base whose transformer reads 128 channels
(``families.FLUX_CONTROL_CHANNELS``, from its config) is a *control base*: no ControlNet is
resolved; ``FluxControl{,Img2Img,Inpaint}Pipeline`` get the one unit's image as
``control_image`` (the unit's weight only says it is on: the base has no strength knob).

SD3 / SD3.5:

* ``cfg`` is classifier-free guidance, with the negative prompt.
* ControlNets (``SD3ControlNetModel``): txt2img with any units; inpaint with one
  ``inpaint`` unit runs ``StableDiffusion3ControlNetInpaintingPipeline`` (an inpainting
  ControlNet: its condition is the picture and the mask); diffusers has no SD3 ControlNet
  img2img pipeline, so img2img with units (and inpaint with other units) is
  :class:`~shared.errors.Unsupported` saying what works; the hires pass (img2img) refines
  without the units.  The SD3 ControlNet pipelines
  VAE-encode the control image with torch's global generator; the call runs in a forked
  RNG seeded with the job's seed, so a seed still gives the same pixels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image as PILImage

from diffusers import (FlowMatchEulerDiscreteScheduler, FluxControlImg2ImgPipeline,
                       FluxControlInpaintPipeline, FluxControlNetImg2ImgPipeline,
                       FluxControlNetInpaintPipeline, FluxControlNetModel,
                       FluxControlNetPipeline, FluxControlPipeline, FluxImg2ImgPipeline,
                       FluxInpaintPipeline, FluxKontextInpaintPipeline, FluxKontextPipeline,
                       FluxMultiControlNetModel, FluxPipeline, SD3ControlNetModel,
                       SD3MultiControlNetModel, StableDiffusion3ControlNetInpaintingPipeline,
                       StableDiffusion3ControlNetPipeline, StableDiffusion3Img2ImgPipeline,
                       StableDiffusion3InpaintPipeline, StableDiffusion3Pipeline)

from shared.errors import Unsupported, UnsupportedCondition

from ..catalogue import Resolved
from ..families import FAMILIES, FLUX_UNION_MODES
from .cache import BaseEntry
from .edit import EDIT_KINDS, edit_kwargs
from .geometry import Pass
from .loaders import dtype_kwargs
from .reuse import control_window, prompt_kwargs

log = logging.getLogger(__name__)

_NOTED: set = set()  # bases whose ignored negative prompt was logged
Encode = Callable[[Any, str, Optional[str], bool], Dict[str, Any]]


def _encode_flux(pipe, prompt: str, negative: Optional[str], cfg: bool) -> Dict[str, Any]:
    embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None,
                                           device=pipe._execution_device,
                                           num_images_per_prompt=1)
    return dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled)


def _encode_sd3(pipe, prompt: str, negative: Optional[str], cfg: bool) -> Dict[str, Any]:
    embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
        prompt=prompt, prompt_2=None, prompt_3=None, device=pipe._execution_device,
        num_images_per_prompt=1, do_classifier_free_guidance=cfg, negative_prompt=negative)
    return dict(prompt_embeds=embeds, negative_prompt_embeds=negative_embeds,
                pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled)


@dataclass(frozen=True)
class DitFamily:
    """What one transformer family runs with (see the module docstring)."""

    name: str
    pipelines: Mapping[Tuple[str, bool], type]   # (mode, with controls) -> pipeline class
    controlnet: type                              # its ControlNet class
    multi: type                                   # its multi-ControlNet wrapper
    encode: Encode                                # prompt -> the pipeline's embeddings
    true_cfg: bool                                # cfg is classifier-free guidance
    union_modes: Mapping[str, int]                # a union ControlNet's mode per condition
    refine_controls: bool                         # the hires (img2img) pass keeps the units
    tools: Mapping[str, type] = field(default_factory=dict)  # a control base's, per mode
    multiple: int = 16                            # work sizes are multiples of this
    cfg_arg: str = "guidance_scale"               # the pipelines' argument for ``cfg``
    blank_negative: Optional[str] = None          # the negative prompt sent for none
    inpaint_net: bool = False                     # inpaint + units: an inpainting ControlNet
    one_net: bool = False                         # its multi-ControlNet runs one model only
    global_rng: bool = False                      # ControlNet pipelines use torch's global RNG

    @property
    def label(self) -> str:
        return FAMILIES[self.name].label

    # -- loading ---------------------------------------------------------------------

    def read_controlnet(self, resolved: Resolved, dtype):
        kwargs = dtype_kwargs(dtype)
        if resolved.weights_variant:
            kwargs["variant"] = resolved.weights_variant
        if resolved.source == "file":
            return self.controlnet.from_single_file(resolved.path, **kwargs)
        return self.controlnet.from_pretrained(resolved.path, local_files_only=True, **kwargs)

    def base_pipeline(self, resolved: Resolved) -> Tuple[type, Dict[str, Any]]:
        """The pipeline class a base loads as, and components to load it with beyond its
        files (Flux / SD3: the txt2img pipeline, nothing more)."""
        return self.pipelines[("txt2img", False)], {}

    def check_compatible(self, net, entry: BaseEntry) -> bool:
        """Whether ``net`` fits the base's transformer (its text and latent widths)."""
        ours, theirs = net.config, entry.pipe.transformer.config
        return ours.joint_attention_dim == theirs.joint_attention_dim and \
            ours.in_channels == theirs.in_channels

    def scheduler(self, sampler: str, config: Mapping[str, Any]):
        return FlowMatchEulerDiscreteScheduler.from_config(dict(config))

    # -- units -------------------------------------------------------------------------

    def control_type(self, condition: str, control_mode: str, resolved: Resolved) -> Optional[int]:
        """The unit's union control mode (None for a classic ControlNet); typed errors for a
        control mode or a condition the ControlNet cannot serve."""
        if control_mode != "balanced":
            raise UnsupportedCondition(
                f"{self.label} ControlNets have one control mode: choose \"balanced\" for "
                f"this unit (\"{control_mode} is more important\" is an SD1.5/SDXL mode).",
                field="control_mode")
        if not resolved.union:
            return None
        mode = self.union_modes.get(condition)
        if mode is None or mode >= resolved.control_types:
            served = ", ".join(c for c, m in self.union_modes.items()
                               if m < resolved.control_types)
            raise UnsupportedCondition(
                f"The union ControlNet {resolved.name!r} has no mode for {condition!r} (it "
                f"serves {served}). For {condition} put a {self.label} {condition} "
                f"ControlNet in config.toml ([controlnets.{self.name}] {condition} = \"hub "
                f"id or path\"), or use an SD1.5 or SDXL base.", field="condition")
        return mode

    def job_units(self, request, nets: Sequence, types: Sequence[Optional[int]]
                  ) -> Tuple[bool, Optional[torch.nn.Module], List[int]]:
        """(classifier-free guidance runs, the multi-ControlNet or None, the units it serves
        in order: those with a weight)."""
        cfg = self.true_cfg and request.cfg > 1.0
        order = [i for i, unit in enumerate(request.controls) if unit.weight > 0]
        if not order or not nets:  # no unit on, or a control base (no ControlNets)
            return cfg, None, order
        if self.inpaint_net and request.mode == "inpaint" and len(order) == 1:
            return cfg, nets[order[0]], order  # the inpainting pipeline takes one ControlNet
        models = [nets[i] for i in order]
        if self.one_net and request.mode != "inpaint":  # one union model, several images
            models = self._one_model(models, request)
        units = self.multi(models)
        units.control_types = [types[i] for i in order]
        return cfg, units, order

    def _one_model(self, models: Sequence, request) -> List:
        if any(m is not models[0] for m in models):
            raise Unsupported(
                f"{self.label} runs several control units through one ControlNet only (its "
                f"union model, given each unit's image); these units use different "
                f"ControlNets. Use the default union ControlNet for every unit, or one unit.",
                field="controls")
        return models[:1]

    def pipeline_class(self, mode: str, controls: bool, request, base: Resolved) -> type:
        if base.control:
            return self._tools_class(mode, request, base)
        cls = self.pipelines.get((mode, controls))
        if cls is None or (controls and mode == "inpaint" and self.inpaint_net and
                           [u.condition for u in request.controls if u.weight > 0]
                           != ["inpaint"]):
            raise Unsupported(
                f"{self.label} ControlNets run in txt2img, and in inpaint as one inpainting "
                f"ControlNet unit (condition \"inpaint\"); diffusers has no {self.label} "
                f"ControlNet {mode} pipeline. Use txt2img, turn the units off for {mode}, or "
                f"pick a Flux, SDXL or SD1.5 base.", field="mode")
        return cls

    def _tools_class(self, mode: str, request, base: Resolved) -> type:
        """A Flux Tools base (FLUX.1 Canny / Depth [dev]) runs with exactly one unit on."""
        units = [u for u in request.controls if u.weight > 0]
        if len(units) != 1 or mode not in self.tools:
            raise Unsupported(
                f"{base.name!r} is a FLUX.1 Tools control base: it takes exactly one control "
                f"unit (got {len(units)} with a weight), whose image is the kind it was "
                f"trained on (edges for Canny, a depth map for Depth). Use one unit, or a "
                f"FLUX.1 base with ControlNets for several.", field="controls")
        return self.tools[mode]

    # -- a pass --------------------------------------------------------------------------

    def call_kwargs(self, request, p: Pass, entry: BaseEntry, pipe, units, order, generator,
                    cfg: bool, stats: Dict[str, Any], cache_size: int) -> Dict[str, Any]:
        """The pipeline's arguments for one pass (the step callback apart)."""
        negative = request.negative_prompt or (self.blank_negative if cfg else None)
        if negative and not self.true_cfg and entry.resolved.key not in _NOTED:
            _NOTED.add(entry.resolved.key)
            log.info("%s is guidance-distilled: the negative prompt is not used",
                     entry.resolved.name)
        kwargs: Dict[str, Any] = prompt_kwargs(
            pipe, entry, request.prompt, negative if self.true_cfg else None, cfg, stats,
            cache_size, encode=lambda: self.encode(pipe, request.prompt, negative, cfg))
        w, h = p.size
        # SD3's inpainting ControlNet inpaints from noise (no init latents, no strength)
        net_inpaint = units is not None and self.inpaint_net and p.kind == "inpaint"
        kwargs.update(num_inference_steps=p.runs if net_inpaint else p.steps,
                      generator=generator, height=h, width=w,
                      output_type="np", **{self.cfg_arg: request.cfg})
        if p.kind in EDIT_KINDS:  # an instruction applied to the layer (.edit)
            kwargs.update(edit_kwargs(p, self.multiple))
        elif p.kind != "txt2img" and not net_inpaint:
            kwargs["image"] = PILImage.fromarray(p.init)
            # these pipelines run ceil(steps x strength) steps, SD's int(steps x strength):
            # the strength that runs exactly the steps planned (and counted for progress)
            kwargs["strength"] = p.runs / p.steps
        if p.kind == "inpaint" and not net_inpaint:
            kwargs["mask_image"] = PILImage.fromarray(p.mask)
        if units is not None:
            kwargs.update(self._control_kwargs(request, p, units, order))
        elif entry.resolved.control:  # a Flux Tools base: the unit's image, to the base
            kwargs["control_image"] = _rgb(p.controls[order[0]])
        return kwargs

    def _control_kwargs(self, request, p: Pass, units, order) -> Dict[str, Any]:
        windows = [control_window(request.controls[i].start, request.controls[i].end, p.runs)
                   for i in order]
        kwargs: Dict[str, Any] = dict(
            controlnet_conditioning_scale=[request.controls[i].weight for i in order],
            control_guidance_start=[s for s, _ in windows],
            control_guidance_end=[e for _, e in windows])
        if self.inpaint_net and p.kind == "inpaint":
            # the inpainting ControlNet's condition: the picture and the selection
            scale = kwargs["controlnet_conditioning_scale"][0]
            kwargs.update(control_image=PILImage.fromarray(p.init),
                          control_mask=PILImage.fromarray(p.mask),
                          controlnet_conditioning_scale=scale)
            return kwargs
        kwargs["control_image"] = [_rgb(p.controls[i]) for i in order]
        if self.name == "flux":
            kwargs["control_mode"] = list(units.control_types)
        return kwargs

    def run(self, pipe, kwargs: Dict[str, Any], seed: int, device: torch.device):
        """Call the pipeline; SD3's (and Qwen-Image's inpainting) ControlNet pipelines draw
        from torch's global generator (see the module docstring), so they run in a forked RNG
        seeded with ``seed``."""
        if not self.global_rng or "control_image" not in kwargs:
            return pipe(**kwargs).images[0]
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return pipe(**kwargs).images[0]

    def preview_latents(self, pipe, latents: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """Flux's and Qwen-Image's packed latents (batch, tokens, 64) as (batch, 16, h, w)
        (Qwen-Image's unpack to one video frame); SD3's as they are."""
        if latents.ndim != 3:
            return latents
        w, h = size
        latents = pipe._unpack_latents(latents, h, w, pipe.vae_scale_factor)
        return latents[:, :, 0] if latents.ndim == 5 else latents


def _rgb(control):
    """A unit's control image for a DiT pipeline (the UNet inpaint condition's masked -1
    pixels become black)."""
    if torch.is_tensor(control):
        array = (control[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round()
        return PILImage.fromarray(array.astype(np.uint8))
    return PILImage.fromarray(np.ascontiguousarray(control))


FLUX = DitFamily(
    "flux",
    {("txt2img", False): FluxPipeline, ("img2img", False): FluxImg2ImgPipeline,
     ("inpaint", False): FluxInpaintPipeline, ("txt2img", True): FluxControlNetPipeline,
     ("img2img", True): FluxControlNetImg2ImgPipeline,
     ("inpaint", True): FluxControlNetInpaintPipeline,
     ("edit", False): FluxKontextPipeline, ("edit_inpaint", False): FluxKontextInpaintPipeline},
    FluxControlNetModel, FluxMultiControlNetModel, _encode_flux, true_cfg=False,
    union_modes=FLUX_UNION_MODES, refine_controls=True,
    tools={"txt2img": FluxControlPipeline, "img2img": FluxControlImg2ImgPipeline,
           "inpaint": FluxControlInpaintPipeline})

SD3 = DitFamily(
    "sd3",
    {("txt2img", False): StableDiffusion3Pipeline,
     ("img2img", False): StableDiffusion3Img2ImgPipeline,
     ("inpaint", False): StableDiffusion3InpaintPipeline,
     ("txt2img", True): StableDiffusion3ControlNetPipeline,
     ("inpaint", True): StableDiffusion3ControlNetInpaintingPipeline},
    SD3ControlNetModel, SD3MultiControlNetModel, _encode_sd3, true_cfg=True, union_modes={},
    refine_controls=False, inpaint_net=True, global_rng=True)
