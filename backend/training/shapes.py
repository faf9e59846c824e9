"""The synthetic "shapes" dataset (like fill50k) and the numpy side of its metrics.

A sample is one filled circle, square or triangle of a named colour on a plain
white background (``target``), its 1-pixel outline drawn white on black
(``source``, the condition), and a prompt such as "red circle on a white
background".  Sample ``i`` of seed ``s`` depends only on ``(s, i)``: the same
seed gives the same pictures whatever the count, so a held-out set is simply
another seed.

The metric helpers turn a generated picture back into a shape mask (pixels far
from the background colour) and a colour name (nearest palette colour), so
:mod:`backend.training.fidelity` can compare what was generated with what was
drawn.  No torch here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw

SHAPES = ("circle", "square", "triangle")
# Well separated in RGB (nearest-colour classification of a generated shape).
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (235, 215, 30),
    "green": (40, 170, 50), "cyan": (30, 200, 210), "blue": (40, 70, 220),
    "purple": (130, 50, 190), "pink": (245, 120, 200),
}
BACKGROUNDS: Dict[str, Tuple[int, int, int]] = {"white": (255, 255, 255)}
SIZE = 64
MARGIN = 3


@dataclass(frozen=True)
class ShapeSample:
    shape: str
    colour: str
    background: str
    prompt: str
    target: np.ndarray      # H x W x 3 uint8: the filled shape
    condition: np.ndarray   # H x W x 3 uint8: white 1-px outline on black
    mask: np.ndarray        # H x W bool: pixels of the filled shape (outline included)


def prompt_for(shape: str, colour: str, background: str = "white") -> str:
    return f"{colour} {shape} on a {background} background"


def outline(mask: np.ndarray) -> np.ndarray:
    """The 1-px inner boundary of a mask (pixels with a 4-neighbour outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~interior


def _geometry(rng: np.random.Generator, shape: str, size: int) -> List[Tuple[float, float]]:
    """Bounding box (circle, square) or vertices (triangle), inside the margin."""
    lo, hi = MARGIN, size - 1 - MARGIN
    if shape == "circle":
        r = rng.uniform(0.11, 0.25) * size
        cx, cy = rng.uniform(lo + r, hi - r, size=2)
        return [(cx - r, cy - r), (cx + r, cy + r)]
    if shape == "square":
        side = rng.uniform(0.21, 0.45) * size
        x0, y0 = rng.uniform(lo, hi - side, size=2)
        return [(x0, y0), (x0 + side, y0 + side)]
    width, height = rng.uniform(0.24, 0.50) * size, rng.uniform(0.21, 0.45) * size
    x0, y0 = rng.uniform(lo, hi - width), rng.uniform(lo, hi - height)
    apex = x0 + width * rng.uniform(0.3, 0.7)
    return [(apex, y0), (x0 + width, y0 + height), (x0, y0 + height)]


def render_mask(shape: str, geometry: Sequence[Tuple[float, float]], size: int) -> np.ndarray:
    layer = PILImage.new("L", (size, size), 0)
    pen = ImageDraw.Draw(layer)
    points = [(round(x), round(y)) for x, y in geometry]
    if shape == "circle":
        pen.ellipse(points, fill=255)
    elif shape == "square":
        pen.rectangle(points, fill=255)
    else:
        pen.polygon(points, fill=255)
    return np.asarray(layer) > 127


def make_sample(seed: int, index: int, size: int = SIZE,
                shapes: Sequence[str] = SHAPES, colours: Sequence[str] = tuple(COLOURS),
                background: str = "white") -> ShapeSample:
    """Sample ``index`` of the dataset with ``seed`` (independent of any other index)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    shape = shapes[int(rng.integers(len(shapes)))]
    colour = colours[int(rng.integers(len(colours)))]
    mask = render_mask(shape, _geometry(rng, shape, size), size)
    target = np.empty((size, size, 3), dtype=np.uint8)
    target[:] = BACKGROUNDS[background]
    target[mask] = COLOURS[colour]
    condition = np.zeros((size, size, 3), dtype=np.uint8)
    condition[outline(mask)] = 255
    return ShapeSample(shape, colour, background, prompt_for(shape, colour, background),
                       target, condition, mask)


def make_samples(count: int, seed: int, size: int = SIZE, start: int = 0) -> List[ShapeSample]:
    return [make_sample(seed, i, size) for i in range(start, start + count)]


def write_dataset(folder, count: int, seed: int, size: int = SIZE) -> Path:
    """Write ``count`` samples in the fill50k layout (source/, target/, prompt.json)."""
    folder = Path(folder)
    (folder / "source").mkdir(parents=True, exist_ok=True)
    (folder / "target").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        sample = make_sample(seed, i, size)
        name = f"{i:06d}.png"
        PILImage.fromarray(sample.condition).save(folder / "source" / name, compress_level=1)
        PILImage.fromarray(sample.target).save(folder / "target" / name, compress_level=1)
        lines.append(json.dumps({"source": f"source/{name}", "target": f"target/{name}",
                                 "prompt": sample.prompt}))
    (folder / "prompt.json").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


# -----------------------------------------------------------------------------
# Metrics on pictures (numpy)
# -----------------------------------------------------------------------------

def _palette() -> Tuple[List[str], np.ndarray]:
    names = list(COLOURS)
    return names, np.array([COLOURS[n] for n in names], dtype=np.float32)


def segment(image: np.ndarray, background: str = "white",
            threshold: Optional[float] = None) -> np.ndarray:
    """Mask of the pixels that are not background: RGB distance to the background
    colour above half the smallest palette-to-background distance."""
    bg = np.array(BACKGROUNDS[background], dtype=np.float32)
    if threshold is None:
        _, palette = _palette()
        threshold = 0.5 * float(np.linalg.norm(palette - bg, axis=1).min())
    distance = np.linalg.norm(image[..., :3].astype(np.float32) - bg, axis=-1)
    return distance > threshold


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def colour_of(image: np.ndarray, mask: np.ndarray) -> Optional[str]:
    """Nearest palette colour to the median colour under ``mask`` (None if empty)."""
    if not mask.any():
        return None
    median = np.median(image[..., :3][mask].astype(np.float32), axis=0)
    names, palette = _palette()
    return names[int(np.linalg.norm(palette - median, axis=1).argmin())]
