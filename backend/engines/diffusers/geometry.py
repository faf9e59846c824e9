"""Geometry of one request, numpy only: the work size at the model's native scale, control
images fitted with a unit's resize mode, the inpaint region and its feathered paste-back,
img2img step counts, and the :class:`Plan` that records these decisions."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import cv2
import numpy as np

from shared.errors import Unsupported

def work_size(width: int, height: int, native: int, max_scale: float = 1.5,
              multiple: int = 8) -> Tuple[int, int]:
    """The size to generate a ``width`` x ``height`` region at.

    Keeps the aspect ratio and brings the area into [native², (max_scale·native)²];
    sides are rounded to ``multiple`` (at least ``max(multiple, native // 8)``).
    """
    side = math.sqrt(width * height)
    if side < native:
        scale = native / side
    elif side > native * max_scale:
        scale = native * max_scale / side
    else:
        scale = 1.0
    least = max(multiple, (native // 8) // multiple * multiple)
    w = max(least, int(round(width * scale / multiple)) * multiple)
    h = max(least, int(round(height * scale / multiple)) * multiple)
    return w, h


def resize(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """Area-average when shrinking, bicubic when enlarging (uint8 saturates, floats don't)."""
    h, w = array.shape[:2]
    if (w, h) == (width, height):
        return array
    interp = cv2.INTER_AREA if width <= w and height <= h else cv2.INTER_CUBIC
    out = cv2.resize(array, (width, height), interpolation=interp)
    if array.ndim == 3 and out.ndim == 2:
        out = out[..., None]
    return out


def fit_image(array: np.ndarray, width: int, height: int, mode: str) -> np.ndarray:
    """Map an image onto a ``width`` x ``height`` frame with a resize mode.

    * ``just_resize``: stretch each axis independently to the frame.
    * ``crop_and_resize``: scale uniformly by ``max(W/w, H/h)`` so the image covers
      the frame, then crop the overflow equally from both sides (centred).
    * ``resize_and_fill``: scale uniformly by ``min(W/w, H/h)`` so the image fits
      inside, centre it, and fill the bars with zeros (black = no control).
    """
    h, w = array.shape[:2]
    if mode == "just_resize" or (w, h) == (width, height):
        return resize(array, width, height)
    if mode == "crop_and_resize":
        scale = max(width / w, height / h)
        nw, nh = max(width, int(round(w * scale))), max(height, int(round(h * scale)))
        scaled = resize(array, nw, nh)
        x0, y0 = (nw - width) // 2, (nh - height) // 2
        return np.ascontiguousarray(scaled[y0:y0 + height, x0:x0 + width])
    if mode == "resize_and_fill":
        scale = min(width / w, height / h)
        nw = min(width, max(1, int(round(w * scale))))
        nh = min(height, max(1, int(round(h * scale))))
        scaled = resize(array, nw, nh)
        out = np.zeros((height, width) + array.shape[2:], dtype=array.dtype)
        x0, y0 = (width - nw) // 2, (height - nh) // 2
        out[y0:y0 + nh, x0:x0 + nw] = scaled
        return out
    raise Unsupported(f"Unknown resize mode {mode!r}.", field="resize_mode")


def rgb_on_black(rgba: np.ndarray) -> np.ndarray:
    """RGBA8 -> RGB8 composited on black (transparent = no control)."""
    if rgba[..., 3].min() == 255:  # opaque: the common case, no arithmetic
        return np.ascontiguousarray(rgba[..., :3])
    alpha = rgba[..., 3:4].astype(np.uint16)
    return ((rgba[..., :3].astype(np.uint16) * alpha + 127) // 255).astype(np.uint8)


def rgb_on_white(rgba: np.ndarray) -> np.ndarray:
    """RGBA8 -> RGB8 composited on white (a canvas' paper)."""
    if rgba[..., 3].min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    alpha = rgba[..., 3:4].astype(np.uint16)
    rgb = rgba[..., :3].astype(np.uint16)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def mask_values(rgba: np.ndarray) -> np.ndarray:
    """0..1 selection strength of a mask image: luminance composited on black."""
    rgb = rgb_on_black(rgba).astype(np.float32)
    return (rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)) / 255.0


# Context the engine adds around an inpaint selection (inside the image it was sent):
# a quarter of the selection's larger side, at least 32 pixels.
INPAINT_MARGIN_FRACTION = 0.25
INPAINT_MIN_MARGIN = 32


def region_of(mask: np.ndarray, margin_fraction: float = INPAINT_MARGIN_FRACTION,
              min_margin: int = INPAINT_MIN_MARGIN) -> Optional[Tuple[int, int, int, int]]:
    """Bounding box (x0, y0, x1, y1) of ``mask > 0`` plus a margin, clamped; None if empty."""
    ys, xs = np.nonzero(mask > 0)
    if len(xs) == 0:
        return None
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    margin = max(min_margin, int(round(margin_fraction * max(x1 - x0, y1 - y0))))
    h, w = mask.shape
    return max(0, x0 - margin), max(0, y0 - margin), min(w, x1 + margin), min(h, y1 + margin)


# The demo model draws a shape of 22 to 50 % of its square's side: the square generated
# around a drawing is sized so the drawing takes SQUARE_SHARE of it, up to
# SQUARE_MAX_SHARE when the canvas' shorter side caps the square.
SQUARE_SHARE = 0.4
SQUARE_MAX_SHARE = 0.6


def square_region(strokes: Optional[np.ndarray], width: int, height: int,
                  share: float = SQUARE_SHARE, max_share: float = SQUARE_MAX_SHARE
                  ) -> Tuple[int, int, int, int]:
    """The square (x0, y0, x1, y1) to generate a ``width`` x ``height`` canvas on, for a
    model trained on squares only.

    With strokes (bool mask, canvas size): centred on their bounding box, side
    ``extent / share`` (``extent`` = the box's longer side), clamped into the canvas; if
    the drawing would then take more than ``max_share`` of the square, the square grows
    to ``extent / max_share`` and reaches past the canvas (letterbox: the part outside
    gets no control and is cut off afterwards).  Without strokes: the largest centred
    square inside the canvas.
    """
    short = min(width, height)
    if strokes is None or not strokes.any():
        side = short
        cx, cy = width / 2.0, height / 2.0
    else:
        ys, xs = np.nonzero(strokes)
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
        extent = max(x1 - x0, y1 - y0)
        side = int(math.ceil(extent / share))
        if side > short:
            side = max(short, int(math.ceil(extent / max_share)))
        side = max(8, side)
        cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0

    def start(centre: float, length: int) -> int:
        s = int(round(centre - side / 2.0))
        return min(max(s, 0), length - side) if side <= length else \
            max(min(s, 0), length - side)

    sx, sy = start(cx, width), start(cy, height)
    return sx, sy, sx + side, sy + side


def crop_padded(array: np.ndarray, region: Tuple[int, int, int, int], fill=0) -> np.ndarray:
    """``array[y0:y1, x0:x1]`` where the region may reach past the array: ``fill`` there."""
    x0, y0, x1, y1 = region
    h, w = array.shape[:2]
    if x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h:
        return np.ascontiguousarray(array[y0:y1, x0:x1])
    out = np.full((y1 - y0, x1 - x0) + array.shape[2:], fill, dtype=array.dtype)
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if ix1 > ix0 and iy1 > iy0:
        out[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = array[iy0:iy1, ix0:ix1]
    return out


def feather_weights(mask: np.ndarray, radius: float) -> np.ndarray:
    """Paste-back weight: the mask value, faded in over ``radius`` pixels inside the
    selection's edge.  Exactly 0 wherever ``mask`` is 0."""
    inside = (mask > 0).astype(np.uint8)
    if radius <= 0 or inside.all():
        return mask.astype(np.float32)
    dist = cv2.distanceTransform(inside, cv2.DIST_L2, 5)
    ramp = np.clip(dist / float(radius), 0.0, 1.0)
    return (mask * ramp).astype(np.float32) * inside


def denoise_steps(steps: int, strength: float) -> Tuple[int, int]:
    """(num_inference_steps to ask for, steps that actually run) for img2img/inpaint.

    diffusers runs ``min(int(steps * strength), steps)`` steps; when that is 0 we ask
    for ``ceil(1 / strength)`` steps so exactly one runs.
    """
    run = min(int(steps * strength), steps)
    if run >= 1:
        return steps, run
    asked = int(math.ceil(1.0 / strength))
    return asked, max(1, min(int(asked * strength), asked))


@dataclass
class Pass:
    """One pipeline call per image: what goes in, at which size."""

    kind: str                         # "txt2img" | "img2img" | "inpaint" | "edit" | "edit_inpaint"
    size: Tuple[int, int]
    steps: int                        # num_inference_steps
    runs: int                         # steps that actually run
    strength: float = 1.0
    init: Optional[np.ndarray] = None     # RGB8 at size
    mask: Optional[np.ndarray] = None     # uint8 0/255 at size
    controls: List[Any] = field(default_factory=list)  # RGB8 arrays or tensors, unit order
    vae_tiling: bool = False
    references: List[Any] = field(default_factory=list)  # edit mode: further pictures, RGB8


@dataclass
class Plan:
    """Everything decided before the first step (kept as ``engine.last_plan`` for tests)."""

    canvas: Tuple[int, int]
    region: Tuple[int, int, int, int]      # x0, y0, x1, y1 on the canvas
    native: int
    family: str
    first: Pass
    hires: Optional[Tuple[int, int]] = None
    init_canvas: Optional[np.ndarray] = None   # RGBA8 canvas (img2img / inpaint)
    weights: Optional[np.ndarray] = None       # inpaint paste-back weights, region size
    unchanged: bool = False                    # nothing to do (empty selection, strength 0)
    # txt2img on a square that is not the canvas (a square-only model on a non-square
    # canvas): the canvas outside it is painted with the generated square's background
    square: bool = False

    @property
    def work(self) -> Tuple[int, int]:
        return self.first.size

    @property
    def steps_per_image(self) -> int:
        return self.first.runs + (self.hires_runs if self.hires else 0)

    hires_runs: int = 0
