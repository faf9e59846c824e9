"""FakeEngine: deterministic pixels without torch (tests, the protocol, the plug-ins)."""

from __future__ import annotations

import hashlib
import time
from typing import Mapping, Sequence

import numpy as np

from shared.images import Image
from shared.messages import GenerateRequest, ModelInfo, Models, Preprocess

from ..annotators.controls import prepare_controls
from ..annotators.library import annotate, list_annotators
from ..annotators.registry import Annotated
from ..imaging import from_array, luminance, resize_nearest, to_array
from .base import Generated, JobContext, step_boundary


def _colour(prompt: str, seed: int) -> np.ndarray:
    digest = hashlib.sha256(f"{prompt}\0{seed}".encode()).digest()
    return np.frombuffer(digest[:3], dtype=np.uint8).astype(np.float32)


class FakeEngine:
    """Deterministic stand-in for tests, the protocol and the plug-ins.

    The picture is a flat colour derived from (prompt, seed) with a horizontal
    gradient; every control image darkens the output where it is bright (so
    the control visibly steers the result, scaled by its weight); img2img blends
    towards the init image by ``1 - strength``; inpaint keeps every pixel outside
    the mask exactly.  Each step sleeps ``step_seconds`` and reports progress.
    """

    name = "fake"
    preempts_between_steps = True  # it keeps no state between steps: a live job may run there

    def __init__(self, step_seconds: float = 0.0) -> None:
        self.step_seconds = step_seconds

    def generate(self, request: GenerateRequest, images: Mapping[int, Image],
                 ctx: JobContext) -> Sequence[Generated]:
        if any(u.preprocessor != "none" or u.pose is not None for u in request.controls):
            ctx.progress(0, 1, stage="preprocess")
            request, images = prepare_controls(request, images, None)
        total = request.steps * request.batch
        seeds = request.seeds(request.seed)
        out = []
        for index, seed in enumerate(seeds):
            for step in range(1, request.steps + 1):
                self._pretend_work(ctx)
                ctx.progress(index * request.steps + step, total)
                if ctx.wants_preview(step):
                    ctx.preview(step, Image.filled(8, 8, (*_colour(request.prompt, seed)
                                                            .astype(np.uint8).tolist(), 255)))
                step_boundary(ctx)
            out.append(Generated(self._picture(request, images, seed), seed))
        return out

    def _pretend_work(self, ctx: JobContext) -> None:
        """Sleep one step, noticing a cancel within ~2 ms (as a real engine would
        within one step)."""
        end = time.monotonic() + self.step_seconds
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.002))
            ctx.check_cancelled()

    def _picture(self, request: GenerateRequest, images: Mapping[int, Image],
                 seed: int) -> Image:
        w, h = request.width, request.height
        colour = _colour(request.prompt, seed)
        ramp = np.linspace(0.6, 1.0, w, dtype=np.float32)[None, :, None]
        rgb = np.broadcast_to(colour[None, None, :] * ramp, (h, w, 3)).copy()
        for unit in request.controls:
            control = resize_nearest(to_array(images[unit.image]), w, h)
            rgb *= (1.0 - 0.5 * unit.weight * (luminance(control) / 255.0))[..., None].clip(0, 1)
        if request.mode in ("img2img", "inpaint", "edit"):
            init = resize_nearest(to_array(images[request.init_image]), w, h)
            rgb = init[..., :3] * (1.0 - request.strength) + rgb * request.strength
        result = np.empty((h, w, 4), dtype=np.uint8)
        result[..., :3] = rgb.clip(0, 255).astype(np.uint8)
        result[..., 3] = 255
        if request.mode in ("inpaint", "edit") and request.mask_image is not None:
            init = resize_nearest(to_array(images[request.init_image]), w, h)
            mask = resize_nearest(to_array(images[request.mask_image]), w, h)
            keep = luminance(mask) < 128
            result[keep] = init[keep]
        return from_array(result)

    def preprocess(self, message: Preprocess, image: Image, ctx: JobContext) -> Annotated:
        return annotate(message, image, ctx)

    def models(self) -> Models:
        return Models(
            models=(ModelInfo(name="fake", kind="base", family="sd15", present=True,
                              source="built in"),),
            annotators=list_annotators(),
            default_base="fake")

    def close(self) -> None:
        pass
