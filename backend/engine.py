"""The Engine protocol, and FakeEngine: deterministic pixels without torch.

An engine turns a validated request plus its images into images.  It is called
from the job worker thread only (one thread owns the GPU), so an engine needs no
locking of its own.  It reports progress and previews through the
:class:`JobContext` it is given; ``ctx.progress`` raises
:class:`~shared.errors.Cancelled` when the job was cancelled, which is how a
running job stops within one step.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

import numpy as np

from shared.errors import Unsupported
from shared.images import Image
from shared.messages import GenerateRequest, ModelInfo, Models, Preprocess


class JobContext(Protocol):
    job_id: str

    def progress(self, step: int, total: int, stage: str = "denoise") -> None:
        """Report progress; raises Cancelled if the job was cancelled meanwhile."""

    def wants_preview(self, step: int) -> bool:
        """Whether a preview for this step would be sent (so engines skip the work if not)."""

    def preview(self, step: int, image: Image) -> None:
        """Send a small preview image of the current state."""

    def check_cancelled(self) -> None:
        """Raise Cancelled if the job was cancelled."""


class NullContext:
    """A JobContext that reports nowhere and is never cancelled: for running an engine
    directly (benchmarks, tests, computing the expected pixels of a request)."""

    job_id = "0" * 32

    def progress(self, step: int, total: int, stage: str = "denoise") -> None:
        pass

    def wants_preview(self, step: int) -> bool:
        return False

    def preview(self, step: int, image: Image) -> None:
        pass

    def check_cancelled(self) -> None:
        pass


@dataclass(frozen=True)
class Generated:
    image: Image
    seed: int


@dataclass(frozen=True)
class Annotated:
    """A preprocess result: the control image, and what else the annotator found (sent
    to the client as the result's ``info``, e.g. detected pose keypoints)."""
    image: Image
    info: Mapping[str, object] = field(default_factory=dict)


class Engine(Protocol):
    name: str

    def generate(self, request: GenerateRequest, images: Mapping[int, Image],
                 ctx: JobContext) -> Sequence[Generated]:
        """Run one request (``request.seed`` is already resolved, never -1)."""

    def preprocess(self, message: Preprocess, image: Image, ctx: JobContext) -> Annotated:
        """Turn a canvas image into a control image (usually ``preprocess.annotate``)."""

    def models(self) -> Models:
        """What this engine can use."""

    def close(self) -> None:
        """Release models and memory."""


# -----------------------------------------------------------------------------
# FakeEngine
# -----------------------------------------------------------------------------

def to_array(image: Image) -> np.ndarray:
    """H x W x 4 uint8 view of an Image (read-only, no copy)."""
    return np.frombuffer(image.data, dtype=np.uint8).reshape(image.height, image.width, 4)


def from_array(array: np.ndarray) -> Image:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 4:
        raise ValueError(f"expected H x W x 4, got {array.shape}")
    return Image(array.shape[1], array.shape[0], array.tobytes())


def resize_nearest(array: np.ndarray, width: int, height: int) -> np.ndarray:
    h, w = array.shape[:2]
    if (w, h) == (width, height):
        return array
    ys = (np.arange(height) * h // height).clip(0, h - 1)
    xs = (np.arange(width) * w // width).clip(0, w - 1)
    return array[ys][:, xs]


def luminance(array: np.ndarray) -> np.ndarray:
    """0..255 float luminance of RGBA composited on black (transparent = dark)."""
    rgb = array[..., :3].astype(np.float32)
    alpha = array[..., 3:4].astype(np.float32) / 255.0
    return (rgb * alpha) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


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

    def __init__(self, step_seconds: float = 0.0) -> None:
        self.step_seconds = step_seconds

    def generate(self, request: GenerateRequest, images: Mapping[int, Image],
                 ctx: JobContext) -> Sequence[Generated]:
        if any(u.preprocessor != "none" or u.pose is not None for u in request.controls):
            from .preprocess import prepare_controls
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
        if request.mode in ("img2img", "inpaint"):
            init = resize_nearest(to_array(images[request.init_image]), w, h)
            rgb = init[..., :3] * (1.0 - request.strength) + rgb * request.strength
        result = np.empty((h, w, 4), dtype=np.uint8)
        result[..., :3] = rgb.clip(0, 255).astype(np.uint8)
        result[..., 3] = 255
        if request.mode == "inpaint":
            init = resize_nearest(to_array(images[request.init_image]), w, h)
            mask = resize_nearest(to_array(images[request.mask_image]), w, h)
            keep = luminance(mask) < 128
            result[keep] = init[keep]
        return from_array(result)

    def preprocess(self, message: Preprocess, image: Image, ctx: JobContext) -> Annotated:
        from .preprocess import annotate
        return annotate(message, image, ctx)

    def models(self) -> Models:
        from .preprocess import list_annotators
        return Models(
            models=(ModelInfo(name="fake", kind="base", family="sd15", present=True,
                              source="built in"),),
            annotators=list_annotators(),
            default_base="fake")

    def close(self) -> None:
        pass


ENGINES = ("diffusers", "demo", "tiny", "fake")


def create_engine(name: str, **options) -> Engine:
    """The engine called ``name``; heavy engines are imported only when chosen.

    ``diffusers``: the real engine on the configured models (options: device, dtype,
    offload, memory_budget_gb, ... and config_file); ``demo``: the real engine on the
    embedded trained demo model (no download, no GPU; outline conditions only);
    ``tiny``: the real engine on random-weight tiny models (every condition; tests and
    benchmarks); ``fake``: deterministic pixels without torch (option: step_seconds).
    """
    if name == "fake":
        return FakeEngine(step_seconds=float(options.get("step_seconds") or 0.0))
    if name in ("diffusers", "demo", "tiny"):
        from .diffusers_engine import DiffusersEngine
        options = {k: v for k, v in options.items() if v is not None and k != "step_seconds"}
        if name in ("tiny", "demo"):
            # the embedded models are small fp32 ones: only these options apply
            kept = {k: options[k] for k in ("device", "cpu_threads") if k in options}
            return (DiffusersEngine.embedded if name == "tiny" else DiffusersEngine.demo)(**kept)
        config_file = options.pop("config_file", None)
        return DiffusersEngine.from_options(options, config_file)
    raise Unsupported(f"Unknown engine {name!r}; choose one of {', '.join(ENGINES)}.",
                      field="engine")
