"""Control fidelity of the demo engine on whole canvases of any shape (``bench fidelity``).

Each held-out 64² shape (``backend.training.fidelity.heldout``) is enlarged to a tile
whose side is the canvas' shorter side and placed at a seeded, usually off-centre
position along the longer side; the condition is the enlarged shape's outline (white
on black, 2 px) on the whole canvas.  The request goes through
``DiffusersEngine.generate`` (what the server runs), once with an outline unit and
once without control, same seed.  The picture is segmented like the 64² benchmark
(pixels far from white) and compared with the filled shape on the canvas.

Per canvas: IoU with / without control, colour accuracy overall and per colour
(each of the demo's colours on its own), and the share of "stray" pixels (shape-like
pixels farther than a tile from the drawn shape: blobs painted away from the drawing).
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from shared.messages import ControlUnit, GenerateRequest

from ..imaging import from_array, to_array
from ..training.shapes import COLOURS, colour_of, iou, make_sample, segment

CANVASES: Tuple[Tuple[int, int], ...] = ((512, 288), (288, 512), (256, 256))


class _Quiet:
    """The smallest job context: no progress, no previews, never cancelled."""

    def progress(self, done, total):
        pass

    def wants_preview(self, done):
        return False

    def preview(self, done, image):
        pass

    def check_cancelled(self):
        pass


def place(sample, width: int, height: int, index: int, seed: int = 0):
    """(condition RGBA on the canvas, filled mask on the canvas) for a 64² sample."""
    side = min(width, height)
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, width, height]))
    x0 = int(rng.integers(0, width - side + 1))
    y0 = int(rng.integers(0, height - side + 1))
    tile = cv2.resize(sample.mask.astype(np.uint8), (side, side),
                      interpolation=cv2.INTER_NEAREST)
    mask = np.zeros((height, width), bool)
    mask[y0:y0 + side, x0:x0 + side] = tile > 0
    edge = mask & ~cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    condition = np.zeros((height, width, 4), np.uint8)
    condition[..., 3] = 255
    condition[edge, :3] = 255
    return condition, mask


def stray_share(found: np.ndarray, drawn: np.ndarray) -> float:
    """Share of the canvas that is segmented as shape but farther than the drawn shape's
    own size from it (extra blobs away from the drawing)."""
    ys, xs = np.nonzero(drawn)
    reach = max(int(xs.max() - xs.min()), int(ys.max() - ys.min())) // 2 + 1
    near = cv2.dilate(drawn.astype(np.uint8), np.ones((2 * reach + 1,) * 2, np.uint8)) > 0
    return float((found & ~near).sum() / found.size)


def _generate(engine, sample, width, height, condition, seed, control: bool) -> np.ndarray:
    units = [ControlUnit(condition="lineart", image=0)] if control else []
    request = GenerateRequest(width=width, height=height, prompt=sample.prompt, seed=seed,
                              steps=20, cfg=3.0, sampler="ddim", base_model="shapes-demo",
                              controls=units)
    images = {0: from_array(condition)} if control else {}
    return to_array(engine.generate(request, images, _Quiet())[0].image)[..., :3]


def measure_canvases(engine, count: int = 32, canvases: Sequence[Tuple[int, int]] = CANVASES,
                     seed: int = 0, keep_images: int = 0) -> Dict[str, Any]:
    """Figures per canvas (key ``"WxH"``); see the module doc.  ``engine`` is
    ``DiffusersEngine.demo()``; sample i uses seed + i with and without control."""
    from ..training.fidelity import HELDOUT_SEED

    # held-out shapes, the colours taken in turn so each colour gets count / 8 of them
    # (make_sample draws the colour before the geometry: the shapes stay those of heldout)
    names = list(COLOURS)
    samples = [make_sample(HELDOUT_SEED, i, colours=(names[i % len(names)],))
               for i in range(count)]
    started = time.perf_counter()
    out: Dict[str, Any] = {}
    kept: Dict[str, List[Tuple[np.ndarray, np.ndarray]]] = {}
    for width, height in canvases:
        key = f"{width}x{height}"
        with_, without, stray = [], [], []
        right: Dict[str, List[int]] = {c: [] for c in COLOURS}
        right_without: Dict[str, List[int]] = {c: [] for c in COLOURS}
        for i, sample in enumerate(samples):
            condition, drawn = place(sample, width, height, i, seed)
            made = _generate(engine, sample, width, height, condition, seed + i, True)
            plain = _generate(engine, sample, width, height, condition, seed + i, False)
            found = segment(made, sample.background)
            with_.append(iou(found, drawn))
            stray.append(stray_share(found, drawn))
            right[sample.colour].append(int(colour_of(made, found) == sample.colour))
            found_plain = segment(plain, sample.background)
            without.append(iou(found_plain, drawn))
            right_without[sample.colour].append(
                int(colour_of(plain, found_plain) == sample.colour))
            if i < keep_images:
                kept.setdefault(key, []).append((condition[..., :3], made))
        out[key] = {
            "iou_with_control": round(float(np.mean(with_)), 4),
            "iou_without_control": round(float(np.mean(without)), 4),
            "colour_accuracy": round(float(np.mean(sum(right.values(), []))), 4),
            "colour_accuracy_per_colour": _per_colour(right),
            "colour_accuracy_per_colour_without_control": _per_colour(right_without),
            "stray_share_mean": round(float(np.mean(stray)), 5),
            "stray_share_max": round(float(np.max(stray)), 5),
        }
    result: Dict[str, Any] = {"canvases": out, "canvas_samples": count,
                              "canvas_seconds": round(time.perf_counter() - started, 2)}
    if keep_images:
        result["_images"] = kept
    return result


def _per_colour(right: Dict[str, List[int]]) -> Dict[str, Optional[float]]:
    """Accuracy of each colour on its own ({colour: share or None when not drawn})."""
    return {c: (round(float(np.mean(v)), 4) if v else None) for c, v in right.items()}
