"""Control fidelity of a shapes ControlNet, measured through diffusers' pipelines.

For each held-out shape (another seed than the training data), generate once
with the ControlNet (``StableDiffusionControlNetPipeline``, the pipeline family the
server uses) and once without it (``StableDiffusionPipeline.from_pipe``, the same
base, the same per-sample seeds), segment the picture (pixels far from the
background) and compare with the filled shape the condition outlines:

* ``iou_with_control`` / ``iou_without_control``: mean IoU of the two masks;
* ``colour_accuracy``: share of images whose shape colour (nearest palette
  colour to the median under the generated mask) is the prompt's colour;
* ``iou_ceiling``: the same IoU for the true pictures passed through the VAE
  (what a perfect diffusion model could reach with this VAE and segmentation);
* ``iou_chance``: IoU of each held-out shape with another held-out shape (what
  ignoring the condition scores by chance with this shape distribution).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline
from PIL import Image as PILImage

from .common import pixels, sampling_scheduler
from .shapes import ShapeSample, colour_of, iou, make_samples, segment

HELDOUT_SEED = 1_000_003   # the training data of the demo uses small seeds
STEPS = 20
GUIDANCE = 3.0


def heldout(count: int, seed: int = HELDOUT_SEED, size: int = 64) -> List[ShapeSample]:
    return make_samples(count, seed, size)


def load_pipeline(base: str, controlnet: str) -> StableDiffusionControlNetPipeline:
    net = ControlNetModel.from_pretrained(controlnet, local_files_only=True)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        base, controlnet=net, local_files_only=True, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.scheduler = sampling_scheduler(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, samples: Sequence[ShapeSample], control: bool, steps: int = STEPS,
             guidance: float = GUIDANCE, seed: int = 0, batch: int = 16) -> np.ndarray:
    """uint8 N x H x W x 3 pictures for ``samples`` (sample i always uses seed + i)."""
    size = samples[0].target.shape[0]
    out = []
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        kwargs: Dict[str, Any] = dict(
            prompt=[s.prompt for s in chunk], num_inference_steps=steps, guidance_scale=guidance,
            height=size, width=size, output_type="np",
            generator=[torch.Generator().manual_seed(seed + start + i)
                       for i in range(len(chunk))])
        if control:
            kwargs["image"] = [PILImage.fromarray(s.condition) for s in chunk]
        with torch.no_grad():
            images = pipe(**kwargs).images
        out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def score(images: np.ndarray, samples: Sequence[ShapeSample]) -> Dict[str, float]:
    ious, right = [], 0
    for image, sample in zip(images, samples):
        mask = segment(image, sample.background)
        ious.append(iou(mask, sample.mask))
        right += colour_of(image, mask) == sample.colour
    return {"iou": float(np.mean(ious)), "colour_accuracy": right / len(samples)}


@torch.no_grad()
def vae_ceiling(vae, samples: Sequence[ShapeSample]) -> float:
    """Mean IoU of the true pictures after VAE encode (mean) + decode."""
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    target = np.stack([s.target for s in samples])
    decoded = vae.decode(vae.encode(pixels(target, device, dtype)).latent_dist.mean).sample
    images = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().byte()
    images = images.permute(0, 2, 3, 1).cpu().numpy()
    return score(images, samples)["iou"]


def chance_iou(samples: Sequence[ShapeSample]) -> float:
    """Mean IoU of each held-out shape with the next one's: what a model that draws a
    plausible shape anywhere, ignoring the condition, scores by chance."""
    n = len(samples)
    if n < 2:
        return 0.0
    return float(np.mean([iou(samples[i].mask, samples[(i + 1) % n].mask) for i in range(n)]))


def without_control_pipeline(pipe: StableDiffusionControlNetPipeline) -> StableDiffusionPipeline:
    plain = StableDiffusionPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
        scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    plain.set_progress_bar_config(disable=True)
    return plain


def measure(pipe: StableDiffusionControlNetPipeline, count: int = 64, steps: int = STEPS,
            guidance: float = GUIDANCE, seed: int = 0, without: bool = True,
            samples: Optional[Sequence[ShapeSample]] = None, keep_images: bool = False
            ) -> Dict[str, Any]:
    """Fidelity figures of ``pipe`` on ``count`` held-out shapes (see the module doc)."""
    given = samples is not None
    samples = list(samples) if given else heldout(count)
    started = time.perf_counter()
    made = generate(pipe, samples, True, steps, guidance, seed)
    with_ = score(made, samples)
    result: Dict[str, Any] = {
        "iou_with_control": round(with_["iou"], 4),
        "colour_accuracy": round(with_["colour_accuracy"], 4),
        "samples": len(samples), "steps": steps, "guidance": guidance,
        "sampler": type(pipe.scheduler).__name__,
        "heldout_seed": None if given else HELDOUT_SEED}
    if without:
        plain = generate(without_control_pipeline(pipe), samples, False, steps, guidance, seed)
        without_ = score(plain, samples)
        result["iou_without_control"] = round(without_["iou"], 4)
        result["colour_accuracy_without_control"] = round(without_["colour_accuracy"], 4)
        if keep_images:
            result["images_without_control"] = plain
    result["iou_ceiling"] = round(vae_ceiling(pipe.vae, samples), 4)
    result["iou_chance"] = round(chance_iou(samples), 4)
    result["seconds"] = round(time.perf_counter() - started, 2)
    if keep_images:
        result["images_with_control"] = made
    return result


def measure_folders(base: str, controlnet: str, count: int = 64, **options) -> Dict[str, Any]:
    """``measure`` for a saved base folder and ControlNet folder."""
    result = measure(load_pipeline(str(base), str(controlnet)), count, **options)
    result.update(base=Path(base).name, controlnet=Path(controlnet).name)
    return result
