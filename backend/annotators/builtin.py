"""The weight-free annotators (numpy + OpenCV): ours, registered by :func:`register_all`."""

from __future__ import annotations

import math
from typing import Tuple

import cv2
import numpy as np

from shared.errors import FieldError
from shared.images import Image
from shared import pose as shared_pose

from ..imaging import to_array, grey, on_black, on_white, resize_plane, resize_rgba
from ..pose import detect as pose_detect
from .registry import Annotator, EmptyLayer, P, Size


def _grey3(plane: np.ndarray) -> np.ndarray:
    return np.repeat(plane[..., None], 3, axis=2)


def _disk(radius: int) -> np.ndarray:
    d = 2 * radius + 1
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (d, d))


def _dilate(plane: np.ndarray, radius: int) -> np.ndarray:
    return cv2.dilate(plane, _disk(radius)) if radius > 0 else plane


def shrink_factor(shape: Tuple[int, ...], size: Size) -> float:
    """How many input pixels become one output pixel (>1 = reduction)."""
    return math.sqrt((shape[0] * shape[1]) / float(size[0] * size[1]))


def ink_at(ink: np.ndarray, size: Size) -> np.ndarray:
    """Resize a 0..255 ink mask, thickening first so lines survive a big reduction."""
    factor = shrink_factor(ink.shape, size)
    if factor > 1.5:
        ink = _dilate(ink, int(round(factor / 2)))
    return resize_plane(ink, size)


# -----------------------------------------------------------------------------
# Weight-free annotators
# -----------------------------------------------------------------------------

def _none(rgba, size, p):
    return resize_rgba(rgba, size)


def _invert(rgba, size, p):
    out = resize_rgba(rgba, size).copy()
    out[..., :3] = 255 - out[..., :3]
    return out


def _canny(rgba, size, p):
    g = grey(on_white(resize_rgba(rgba, size)))
    if p["blur"] > 0:
        g = cv2.GaussianBlur(g, (0, 0), p["blur"])
    return _grey3(cv2.Canny(g, p["low"], p["high"], L2gradient=p["l2"]))


def _check_canny(p):
    if p["low"] > p["high"]:
        raise FieldError(f"params.low ({p['low']}) must not be above params.high ({p['high']}); "
                         f"swap them.", field="params.low")


def _lineart_from_drawing(rgba, size, p):
    g = grey(on_white(rgba))
    if p["mode"] == "adaptive":
        block = max(3, int(p["block"]) | 1)
        ink = cv2.adaptiveThreshold(g, 255, cv2.ADAPTIVE_THRESH_GAUSSIAN_C,
                                    cv2.THRESH_BINARY_INV, block, p["offset"])
    elif p["mode"] == "threshold":
        ink = np.where(g < p["threshold"], 255, 0).astype(np.uint8)
    else:  # soft: keep anti-aliasing and pencil pressure, darkest line = full white
        darkness = 255 - g.astype(np.int32)
        top = max(1, int(darkness.max()))
        ink = (darkness * 255 // top).astype(np.uint8)
    out = ink_at(ink, size)
    out = _dilate(out, p["thickness"])
    if not p["invert"]:
        out = 255 - out
    return _grey3(out)


def _scribble(rgba, size, p):
    small = resize_rgba(rgba, size)
    g = grey(on_white(small))
    polarity = p["polarity"]
    if polarity == "auto":
        # the background is the majority: a mostly dark picture has light strokes
        polarity = "light_on_dark" if np.median(g) < 128 else "dark_on_light"
    if polarity == "light_on_dark":
        g = 255 - g
    if p["threshold"] == 0:
        _, ink = cv2.threshold(g, 0, 255, cv2.THRESH_BINARY_INV | cv2.THRESH_OTSU)
        if ink.mean() > 127:  # Otsu picked the paper: no strokes darker than the rest
            ink = np.where(g < 128, 255, 0).astype(np.uint8)
    else:
        ink = np.where(g < p["threshold"], 255, 0).astype(np.uint8)
    return _grey3(_dilate(ink, p["thickness"]))


def _noise_field(h: int, w: int, cell: int, rng: np.random.Generator) -> np.ndarray:
    gh, gw = max(2, h // cell + 2), max(2, w // cell + 2)
    coarse = rng.random((gh, gw), dtype=np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


def _shuffle(rgba, size, p):
    img = on_white(resize_rgba(rgba, size))
    w, h = size
    rng = np.random.default_rng(p["seed"])
    cell = max(2, int(p["cell"] * min(w, h) / 512))
    fx = _noise_field(h, w, cell, rng) * (w - 1)
    fy = _noise_field(h, w, cell, rng) * (h - 1)
    return cv2.remap(img, fx.astype(np.float32), fy.astype(np.float32),
                     interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def _tile(rgba, size, p):
    img = on_white(rgba)
    if p["down"] > 1.0:
        w, h = size
        low = (max(1, int(round(w / p["down"]))), max(1, int(round(h / p["down"]))))
        img = resize_plane(img, low)
    img = resize_plane(img, size)
    if p["blur"] > 0:
        img = cv2.GaussianBlur(img, (0, 0), p["blur"])
    return img


# ADE20K's 150 class colours (the palette the seg ControlNets were trained on).
ADE20K_PALETTE = np.array([
    120, 120, 120, 180, 120, 120, 6, 230, 230, 80, 50, 50, 4, 200, 3, 120, 120, 80,
    140, 140, 140, 204, 5, 255, 230, 230, 230, 4, 250, 7, 224, 5, 255, 235, 255, 7,
    150, 5, 61, 120, 120, 70, 8, 255, 51, 255, 6, 82, 143, 255, 140, 204, 255, 4,
    255, 51, 7, 204, 70, 3, 0, 102, 200, 61, 230, 250, 255, 6, 51, 11, 102, 255,
    255, 7, 71, 255, 9, 224, 9, 7, 230, 220, 220, 220, 255, 9, 92, 112, 9, 255,
    8, 255, 214, 7, 255, 224, 255, 184, 6, 10, 255, 71, 255, 41, 10, 7, 255, 255,
    224, 255, 8, 102, 8, 255, 255, 61, 6, 255, 194, 7, 255, 122, 8, 0, 255, 20,
    255, 8, 41, 255, 5, 153, 6, 51, 255, 235, 12, 255, 160, 150, 20, 0, 163, 255,
    140, 140, 140, 250, 10, 15, 20, 255, 0, 31, 255, 0, 255, 31, 0, 255, 224, 0,
    153, 255, 0, 0, 0, 255, 255, 71, 0, 0, 235, 255, 0, 173, 255, 31, 0, 255,
    11, 200, 200, 255, 82, 0, 0, 255, 245, 0, 61, 255, 0, 255, 112, 0, 255, 133,
    255, 0, 0, 255, 163, 0, 255, 102, 0, 194, 255, 0, 0, 143, 255, 51, 255, 0,
    0, 82, 255, 0, 255, 41, 0, 255, 173, 10, 0, 255, 173, 255, 0, 0, 255, 153,
    255, 92, 0, 255, 0, 255, 255, 0, 245, 255, 0, 102, 255, 173, 0, 255, 0, 20,
    255, 184, 184, 0, 31, 255, 0, 255, 61, 0, 71, 255, 255, 0, 204, 0, 255, 194,
    0, 255, 82, 0, 10, 255, 0, 112, 255, 51, 0, 255, 0, 194, 255, 0, 122, 255,
    0, 255, 163, 255, 153, 0, 0, 255, 10, 255, 112, 0, 143, 255, 0, 82, 0, 255,
    163, 255, 0, 255, 235, 0, 8, 184, 170, 133, 0, 255, 0, 255, 92, 184, 0, 255,
    255, 0, 31, 0, 184, 255, 0, 214, 255, 255, 0, 112, 92, 255, 0, 0, 224, 255,
    112, 224, 255, 70, 184, 160, 163, 0, 255, 153, 0, 255, 71, 255, 0, 255, 0, 163,
    255, 204, 0, 255, 0, 143, 0, 255, 235, 133, 255, 0, 255, 0, 235, 245, 0, 255,
    255, 0, 122, 255, 245, 0, 10, 190, 212, 214, 255, 0, 0, 204, 255, 20, 0, 255,
    255, 255, 0, 0, 153, 255, 0, 41, 255, 0, 255, 204, 41, 0, 255, 41, 255, 0,
    173, 0, 255, 0, 245, 255, 71, 0, 255, 122, 0, 255, 0, 255, 184, 0, 92, 255,
    184, 255, 0, 0, 133, 255, 255, 214, 0, 25, 194, 194, 102, 255, 0, 92, 0, 255],
    dtype=np.uint8).reshape(-1, 3)
assert ADE20K_PALETTE.shape == (150, 3)


def _seg(rgba, size, p):
    rgb = on_black(rgba)
    opaque = rgba[..., 3] >= 128
    if p["palette"] == "ade20k" and opaque.any():
        packed = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) \
            | rgb[..., 2].astype(np.int32)
        colours, inverse, counts = np.unique(packed[opaque], return_inverse=True,
                                             return_counts=True)
        cols = np.stack([(colours >> 16) & 255, (colours >> 8) & 255, colours & 255], axis=1)
        d = np.linalg.norm(cols[:, None, :].astype(np.float32)
                           - ADE20K_PALETTE[None, :, :].astype(np.float32), axis=2)
        nearest, dist = d.argmin(axis=1), d.min(axis=1)
        off = dist > p["tolerance"]
        off_share = counts[off].sum() / float(counts.sum())
        if off_share > p["max_off"]:
            worst = cols[off][counts[off].argmax()]
            raise FieldError(
                f"This layer does not look like an ADE20K segmentation map: {off_share:.0%} of "
                f"its pixels are not class colours (the commonest is {tuple(int(c) for c in worst)}"
                f"). Paint regions with ADE20K palette colours, run a seg annotator on a photo, "
                f"or set palette=any to pass the colours through unchecked.", field="image")
        if p["snap"]:
            # A blend of two classes (a soft brush edge) can lie near a third class' colour:
            # colours that are not (nearly) exact snap to the classes the map really uses.
            exact = dist <= 8
            share = np.bincount(nearest[exact], weights=counts[exact],
                                minlength=len(ADE20K_PALETTE)) / float(counts.sum())
            used = np.nonzero(share >= 0.001)[0]
            if len(used):
                nearest = np.where(exact, nearest, used[d[:, used].argmin(axis=1)])
            snapped = ADE20K_PALETTE[nearest][inverse.reshape(-1)]
            rgb = rgb.copy()
            rgb[opaque] = snapped
            rgb[~opaque] = 0
    return resize_plane(rgb, size, nearest=True)


def _depth(rgba, size, p):
    g = grey(rgba[..., :3]).astype(np.float32)
    alpha = rgba[..., 3].astype(np.float32) / 255.0
    if p["invert"]:
        g = 255.0 - g
    if p["normalize"]:
        seen = alpha > 0
        lo, hi = float(g[seen].min()), float(g[seen].max())
        if hi > lo:
            g = (g - lo) * (255.0 / (hi - lo))
    g = g * alpha  # transparent = far = black
    out = resize_plane(np.ascontiguousarray(g), size).clip(0, 255)
    return _grey3(np.rint(out).astype(np.uint8))


def _normal(rgba, size, p):
    flat = np.array([128, 128, 255], dtype=np.float32)
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * alpha + flat * (1.0 - alpha)
    rgb = resize_plane(np.ascontiguousarray(rgb), size)
    if p["flip_green"]:
        rgb[..., 1] = 255.0 - rgb[..., 1]
    if p["normalize"]:
        v = rgb / 127.5 - 1.0
        n = np.linalg.norm(v, axis=2, keepdims=True)
        v = np.where(n > 1e-3, v / np.maximum(n, 1e-6), np.array([0, 0, 1], np.float32))
        rgb = (v + 1.0) * 127.5
    return np.rint(rgb.clip(0, 255)).astype(np.uint8)


_LSD = None


def _straight_lines(rgba, size, p):
    global _LSD
    g = grey(on_white(resize_rgba(rgba, size)))
    if _LSD is None:
        _LSD = cv2.createLineSegmentDetector(cv2.LSD_REFINE_STD)
    lines = _LSD.detect(g)[0]
    out = np.zeros((size[1], size[0]), dtype=np.uint8)
    min_len = p["min_length"] * min(size) / 512.0
    if lines is not None:
        for x0, y0, x1, y1 in lines.reshape(-1, 4):
            if math.hypot(x1 - x0, y1 - y0) < min_len:
                continue
            cv2.line(out, (int(round(x0)), int(round(y0))), (int(round(x1)), int(round(y1))),
                     255, p["thickness"], cv2.LINE_AA)
    return _grey3(out)


def _pose_from_photo(rgba, size, p):
    detected = pose_detect.detect(Image(rgba.shape[1], rgba.shape[0], rgba.tobytes()),
                               hands=p["hands"], min_confidence=p["min_confidence"])
    if not detected.people:
        raise EmptyLayer("No person was found in the layer; use a clearer photo of a whole "
                         "figure, or start from the default skeleton.", field="image")
    fitted = detected.resized(*size)
    return to_array(shared_pose.render(fitted))[..., :3], {"keypoints": fitted.to_json()}


def _pose_available() -> bool:
    return pose_detect.detector_available()


def register_all(register) -> None:
    """Register every weight-free annotator (a declarative table)."""
    register(Annotator("none", "", _none, refuse_empty="never",
                       help="Use the layer as it is (only resized)."))
    register(Annotator("invert", "lineart", _invert,
                       help="Swap dark and light (keeps transparency): black lines become white."))
    register(Annotator("canny", "canny", _canny, refuse_empty="uniform", check=_check_canny,
                       params=(
        P("low", "int", 100, 1, 255, help="lower hysteresis threshold"),
        P("high", "int", 200, 1, 255, help="upper hysteresis threshold"),
        P("blur", "float", 0.0, 0, 10, help="Gaussian blur sigma before detection (pixels)"),
        P("l2", "bool", False, help="use the exact L2 gradient magnitude"),
    ), help="Canny edges, white on black, detected at the generation size."))
    register(Annotator("lineart_from_drawing", "lineart", _lineart_from_drawing,
                       refuse_empty="uniform", params=(
        P("mode", "choice", "threshold", choices=("threshold", "adaptive", "soft"),
          help="threshold: ink = darker than threshold; adaptive: local threshold (uneven scans); "
               "soft: keep anti-aliasing and pencil pressure"),
        P("threshold", "int", 192, 1, 255, help="threshold mode: luminance below this is a line"),
        P("block", "int", 25, 3, 255, help="adaptive mode: neighbourhood size (pixels, odd)"),
        P("offset", "int", 8, -64, 64, help="adaptive mode: how much darker than the "
                                             "neighbourhood a line must be"),
        P("thickness", "int", 0, 0, 16, help="extra line thickening at the output size (pixels)"),
        P("invert", "bool", True, help="white lines on black, as the lineart models expect"),
    ), help="Line art drawn on a layer: composite on white, pick the lines, invert. Thin lines are "
            "thickened before a big reduction so they survive."))
    register(Annotator("scribble", "scribble", _scribble, refuse_empty="uniform", params=(
        P("threshold", "int", 0, 0, 255, help="luminance below this is a stroke; 0 = automatic "
                                              "(Otsu)"),
        P("thickness", "int", 2, 0, 32, help="dilation radius at the output size (pixels)"),
        P("polarity", "choice", "auto", choices=("auto", "dark_on_light", "light_on_dark")),
    ), help="A rough sketch as bold white strokes on black."))
    register(Annotator("shuffle", "shuffle", _shuffle, params=(
        P("seed", "int", 0, 0, 2**31 - 1, help="the same seed gives the same shuffle"),
        P("cell", "int", 256, 8, 2048, help="size of the swirls, in pixels at 512"),
    ), help="Content shuffle: the layer's colours and textures, randomly warped."))
    register(Annotator("tile", "tile", _tile, params=(
        P("down", "float", 1.0, 1, 16, help="reduce by this factor first (coarser guide)"),
        P("blur", "float", 0.0, 0, 64, help="Gaussian blur sigma after resizing (pixels)"),
    ), help="The layer itself (composited on white) as a tile/detail guide."))
    register(Annotator("blur", "tile", _tile, params=(
        P("down", "float", 1.0, 1, 16, help="reduce by this factor first"),
        P("blur", "float", 5.0, 0, 64, help="Gaussian blur sigma (pixels)"),
    ), help="A blurred copy of the layer, for the tile model's 'add detail' use."))
    register(Annotator("seg_passthrough", "seg", _seg, params=(
        P("palette", "choice", "ade20k", choices=("ade20k", "any"),
          help="ade20k: check (and snap to) the ADE20K class colours; any: pass through"),
        P("snap", "bool", True, help="replace near-palette colours (brush anti-aliasing) by the "
                                     "exact class colour"),
        P("tolerance", "float", 24.0, 0, 442, help="RGB distance that still counts as a class "
                                                   "colour"),
        P("max_off", "float", 0.05, 0, 1, help="share of off-palette pixels that is refused"),
    ), help="A painted segmentation map (ADE20K colours), checked and resized without blending."))
    register(Annotator("depth_passthrough", "depth", _depth, params=(
        P("invert", "bool", False, help="the painting has near = dark; flip it"),
        P("normalize", "bool", True, help="stretch the painted range to black..white"),
    ), help="A painted depth map: near = white, far = black; transparent = far."))
    register(Annotator("normal_passthrough", "normal", _normal, params=(
        P("flip_green", "bool", False, help="the map uses the other Y convention (DirectX vs "
                                            "OpenGL)"),
        P("normalize", "bool", True, help="re-normalise the vectors after painting/resizing"),
    ), help="A painted normal map (RGB = XYZ); transparent = facing the camera."))
    register(Annotator("straight_lines", "mlsd", _straight_lines, refuse_empty="uniform", params=(
        P("min_length", "float", 24.0, 0, 4096, help="drop segments shorter than this (pixels at "
                                                     "512)"),
        P("thickness", "int", 1, 1, 16, help="drawn line width (pixels)"),
    ), help="Straight line segments (OpenCV's line segment detector), white on black, for the "
            "MLSD model; no weights needed."))
    register(Annotator("pose_from_photo", "openpose", _pose_from_photo, refuse_empty="uniform",
                       is_available=_pose_available,
                       unavailable_hint="it needs the OpenPose weights with controlnet-aux, or "
                                        "MediaPipe (run `controlcanvas setup pose`, or set "
                                        "CONTROLCANVAS_MEDIAPIPE_PYTHON).",
                       params=(
        P("hands", "bool", False, help="also detect hand keypoints"),
        P("min_confidence", "float", 0.5, 0, 1, help="joints less certain than this are left out"),
    ), help="Detect a person's pose in a photo and draw the OpenPose skeleton (controlnet-aux "
            "OpenPose when its weights are present, else MediaPipe)."))
