"""The diffusers pipelines per (family, mode, controls), and what runs around a pipeline call:
latent previews, cancel points inside the networks, condition images.

Union ControlNets run in the same ControlNet pipelines as classic ones:
:class:`.units.ControlUnits` passes each union call its control types itself, which is
all the ``StableDiffusionXLControlNetUnion*`` pipelines add (a test checks the pixels
against them), and so one request can mix union and classic ControlNets.  A base with a
9-channel (inpainting) UNet runs txt2img and img2img as inpainting of the whole picture
(:func:`full_mask_pass`)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from PIL import Image as PILImage

from diffusers import (StableDiffusionControlNetImg2ImgPipeline,
                       StableDiffusionControlNetInpaintPipeline,
                       StableDiffusionControlNetPipeline, StableDiffusionImg2ImgPipeline,
                       StableDiffusionInpaintPipeline, StableDiffusionPipeline,
                       StableDiffusionXLControlNetImg2ImgPipeline,
                       StableDiffusionXLControlNetInpaintPipeline,
                       StableDiffusionXLControlNetPipeline, StableDiffusionXLImg2ImgPipeline,
                       StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline)

from shared.images import Image

from ...imaging import from_array
from ..base import JobContext
from .compiled import is_compiled
from .geometry import Pass

PIPELINES = {
    # (family, mode, with controls) -> class
    ("sd15", "txt2img", False): StableDiffusionPipeline,
    ("sd15", "img2img", False): StableDiffusionImg2ImgPipeline,
    ("sd15", "inpaint", False): StableDiffusionInpaintPipeline,
    ("sd15", "txt2img", True): StableDiffusionControlNetPipeline,
    ("sd15", "img2img", True): StableDiffusionControlNetImg2ImgPipeline,
    ("sd15", "inpaint", True): StableDiffusionControlNetInpaintPipeline,
    ("sdxl", "txt2img", False): StableDiffusionXLPipeline,
    ("sdxl", "img2img", False): StableDiffusionXLImg2ImgPipeline,
    ("sdxl", "inpaint", False): StableDiffusionXLInpaintPipeline,
    ("sdxl", "txt2img", True): StableDiffusionXLControlNetPipeline,
    ("sdxl", "img2img", True): StableDiffusionXLControlNetImg2ImgPipeline,
    ("sdxl", "inpaint", True): StableDiffusionXLControlNetInpaintPipeline,
}


# Linear latent -> RGB approximations (the usual "cheap preview" factors).
_PREVIEW = {
    "sd15": (np.array([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350],
                       [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]], np.float32),
             np.zeros(3, np.float32)),
    "sdxl": (np.array([[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068],
                       [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]], np.float32),
             np.array([0.1084, -0.0175, -0.0011], np.float32)),
}


def latent_preview(latents: torch.Tensor, family: str) -> Image:
    """An RGBA preview at latent resolution from the first latent of a batch."""
    lat = latents[0].detach().float().cpu().numpy()  # C x h x w
    factors, bias = _PREVIEW.get(family, _PREVIEW["sd15"])
    if lat.shape[0] != factors.shape[0]:
        grey = lat.mean(axis=0, keepdims=True)
        rgb = np.repeat(grey, 3, axis=0).transpose(1, 2, 0)
    else:
        rgb = np.einsum("chw,cr->hwr", lat, factors) + bias
    rgb8 = np.clip((rgb + 1.0) * 127.5, 0, 255).astype(np.uint8)
    out = np.empty(rgb8.shape[:2] + (4,), np.uint8)
    out[..., :3] = rgb8
    out[..., 3] = 255
    return from_array(out)


def inpaint_condition(init_rgb: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """ControlNet-inpaint's condition: the image in [0, 1] with masked pixels set to -1."""
    image = init_rgb.astype(np.float32) / 255.0
    image[mask > 127] = -1.0
    return torch.from_numpy(image.transpose(2, 0, 1)[None].copy())


def _cancel_modules(pipe) -> Iterator[torch.nn.Module]:
    """The blocks before which a running pipeline checks for cancel: each down, mid and
    up block of the UNet, each block of a transformer (Flux, SD3, Z-Image's layers), and of the ControlNet(s)
    (unless compiled: then the step callback is the check), the text encoder(s), the VAE
    coder."""
    for name in ("unet", "transformer", "controlnet"):
        model = getattr(pipe, name, None)
        if model is None:
            continue
        nets = getattr(model, "nets", None) or [model]  # MultiControlNetModel
        for net in nets:
            if is_compiled(net):
                continue  # a Python hook inside a compiled graph would break it
            for blocks in ("down_blocks", "up_blocks", "transformer_blocks",
                           "single_transformer_blocks", "layers", "control_layers"):
                yield from getattr(net, blocks, None) or ()
            if getattr(net, "mid_block", None) is not None:
                yield net.mid_block
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, name, None) is not None:
            yield getattr(pipe, name)
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        for part in ("encoder", "decoder"):
            if getattr(vae, part, None) is not None:
                yield getattr(vae, part)


@contextmanager
def cancel_points(pipe, ctx: JobContext,
                  active: Optional[Callable[[], bool]] = None) -> Iterator[None]:
    """While the block runs, every module of :func:`_cancel_modules` calls
    ``ctx.check_cancelled()`` before its forward, so a cancel lands within a fraction of
    a denoising step rather than at its end (the step callback alone would wait for the
    whole UNet + ControlNet pass, or for the whole VAE decode).  ``active()`` says whether
    this job is the one running now (another job may run in its pause, on the same
    modules: its forwards must not check this job's cancel)."""
    def check(module, args) -> None:
        if active is None or active():
            ctx.check_cancelled()

    handles = [module.register_forward_pre_hook(check) for module in _cancel_modules(pipe)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def clip_skip(pipe, skip: int) -> Iterator[None]:
    """While the block runs, the text encoder ends ``skip - 1`` layers early (A1111's "clip
    skip": 1 = every layer, 2 = the penultimate layer's output, then the final layer
    norm, as diffusers' own ``clip_skip=skip - 1`` does).  Done on the encoder itself:
    diffusers' own path reads ``text_encoder.text_model``, which CLIPTextModel no longer
    has from transformers 5.6."""
    encoder = getattr(pipe, "text_encoder", None)
    if skip <= 1 or encoder is None:
        yield
        return
    stack = getattr(encoder, "text_model", encoder).encoder
    layers = stack.layers
    stack.layers = layers[:len(layers) - (skip - 1)]
    try:
        yield
    finally:
        stack.layers = layers


def to_pipeline_image(control):
    if torch.is_tensor(control):
        return control
    return PILImage.fromarray(np.ascontiguousarray(control))


def control_image(control, union: bool = False):
    """A unit's control image for the pipeline.  The inpaint condition (a tensor, masked
    pixels -1 for SD1.5's inpaint ControlNet) becomes the union model's repaint condition:
    masked pixels black."""
    if union and torch.is_tensor(control):
        return control.clamp(min=0.0)
    return to_pipeline_image(control)


def full_mask_pass(p: Pass) -> Pass:
    """A txt2img or img2img pass as inpainting of the whole picture: what a 9-channel
    inpainting UNet needs (its extra channels see the mask and the masked image; all
    masked, as A1111 runs such models).  txt2img starts from pure noise (strength 1)."""
    w, h = p.size
    init = p.init if p.init is not None else np.full((h, w, 3), 127, np.uint8)
    strength = p.strength if p.kind == "img2img" else 1.0
    return replace(p, kind="inpaint", init=init, mask=np.full((h, w), 255, np.uint8),
                   strength=strength)
