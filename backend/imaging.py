"""Pixels as numpy arrays: Image <-> array, resizing, compositing, image files.

The leaf of the backend: imports numpy, OpenCV, Pillow (image headers) and ``shared``
only, so every layer above (pose, annotators, engines, the server, the CLI) uses one copy
of these rules, the image size limits included (:data:`MAX_IMAGE_SIDE`, :data:`MAX_PIXELS`).
Arrays are H x W x C uint8; RGBA is straight (not premultiplied) alpha.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import cv2
import numpy as np

from shared.errors import FieldError, LimitError
from shared.images import Image

Size = Tuple[int, int]

# The largest image the server (and so the CLI, which uses one) accepts: one place.
MAX_IMAGE_SIDE = 8192
MAX_PIXELS = 40_000_000


# -----------------------------------------------------------------------------
# Image <-> array
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


# -----------------------------------------------------------------------------
# Resizing and compositing
# -----------------------------------------------------------------------------

def resize_plane(array: np.ndarray, size: Size, nearest: bool = False) -> np.ndarray:
    """Area-average when shrinking, bicubic (clipped) when enlarging, or nearest."""
    w, h = size
    if array.shape[1] == w and array.shape[0] == h:
        return array
    if nearest:
        interp = cv2.INTER_NEAREST
    elif w <= array.shape[1] and h <= array.shape[0]:
        interp = cv2.INTER_AREA
    else:
        interp = cv2.INTER_CUBIC
    out = cv2.resize(array, (w, h), interpolation=interp)
    if array.ndim == 3 and out.ndim == 2:
        out = out[..., None]
    return out


def resize_rgba(rgba: np.ndarray, size: Size, nearest: bool = False) -> np.ndarray:
    """Resize straight-alpha RGBA through premultiplied alpha (no dark fringes)."""
    w, h = size
    if rgba.shape[1] == w and rgba.shape[0] == h:
        return rgba
    if nearest or rgba[..., 3].min() == 255:
        return resize_plane(rgba, size, nearest)
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    pre = np.concatenate([rgba[..., :3].astype(np.float32) * alpha, alpha * 255.0], axis=2)
    pre = resize_plane(pre, size).clip(0, 255)
    a = pre[..., 3:4]
    rgb = np.where(a > 0, pre[..., :3] * 255.0 / np.maximum(a, 1e-6), 0)
    out = np.concatenate([rgb, a], axis=2)
    return np.rint(out.clip(0, 255)).astype(np.uint8)


def over(rgba: np.ndarray, background) -> np.ndarray:
    """RGB8 of straight-alpha RGBA composited on an RGB background."""
    alpha = rgba[..., 3:4].astype(np.uint16)
    bg = np.asarray(background, dtype=np.uint16).reshape(1, 1, 3)
    rgb = rgba[..., :3].astype(np.uint16)
    return ((rgb * alpha + bg * (255 - alpha) + 127) // 255).astype(np.uint8)


def on_white(rgba: np.ndarray) -> np.ndarray:
    """RGB8 of the layer composited on white paper."""
    return over(rgba, (255, 255, 255))


def on_black(rgba: np.ndarray) -> np.ndarray:
    return over(rgba, (0, 0, 0))


def grey(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)


# -----------------------------------------------------------------------------
# Image files
# -----------------------------------------------------------------------------

def array_to_rgba8(array: np.ndarray, where: str = "image") -> np.ndarray:
    """Any OpenCV-decoded array (BGR order) -> RGBA8; 16-bit and float are scaled down."""
    if array.dtype == np.uint16:
        array = ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif array.dtype in (np.float32, np.float64):
        array = np.rint(np.clip(array, 0.0, 1.0) * 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise FieldError(f"{where}: {array.dtype} pixels are not supported; save it as an 8- or "
                         f"16-bit image.", field="image")
    if array.ndim == 2:
        return cv2.cvtColor(array, cv2.COLOR_GRAY2RGBA)
    channels = array.shape[2]
    if channels == 1:
        return cv2.cvtColor(array[..., 0], cv2.COLOR_GRAY2RGBA)
    if channels == 2:  # grey + alpha
        out = cv2.cvtColor(np.ascontiguousarray(array[..., 0]), cv2.COLOR_GRAY2RGBA)
        out[..., 3] = array[..., 1]
        return out
    if channels == 3:
        return cv2.cvtColor(array, cv2.COLOR_BGR2RGBA)
    if channels == 4:
        return cv2.cvtColor(array, cv2.COLOR_BGRA2RGBA)
    raise FieldError(f"{where}: {channels} channels are not supported.", field="image")


def _existing_file(path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise FieldError(f"{path} is a folder, not an image file; give the path of a PNG, "
                         f"JPEG, TIFF or WebP file.", field="image")
    if not path.is_file():
        raise FieldError(f"{path}: no such file.", field="image")
    return path


def image_file_size(path) -> Optional[Size]:
    """(width, height) read from the file's header, without decoding its pixels; None when
    Pillow cannot read the header (OpenCV may still read the file)."""
    from PIL import Image as PILImage

    path = _existing_file(path)
    saved, PILImage.MAX_IMAGE_PIXELS = PILImage.MAX_IMAGE_PIXELS, None  # only the header
    try:
        with PILImage.open(path) as im:
            return im.size
    except Exception:  # noqa: BLE001 - not an image Pillow knows: let the decoder say
        return None
    finally:
        PILImage.MAX_IMAGE_PIXELS = saved


def size_problem(width: int, height: int, max_side: int = MAX_IMAGE_SIDE,
                 max_pixels: int = MAX_PIXELS) -> str:
    """Why a width x height image is over the limits ("" when it is not)."""
    if width > max_side or height > max_side:
        return f"over the {max_side} px side limit"
    if width * height > max_pixels:
        return f"over the {max_pixels:,} pixel limit"
    return ""


def load_input_image(path, size: Optional[Size] = None, *, max_side: int = MAX_IMAGE_SIDE,
                     max_pixels: int = MAX_PIXELS) -> Image:
    """An input image from the command line, its size checked from the header first.  Over
    the limits: resized to ``size`` (``--size``) when given, else a LimitError saying what
    to do - before any pixel is decoded."""
    header = image_file_size(path)
    problem = size_problem(*header, max_side, max_pixels) if header else ""
    if not problem:
        return load_image(path)
    if size is None or size_problem(*size, max_side, max_pixels):
        raise LimitError(f"{path}: the image is {header[0]}×{header[1]}, {problem}: pass "
                         f"--size WxH (at most {max_side} px a side) or scale it down.",
                         field="image")
    from PIL import Image as PILImage

    saved, PILImage.MAX_IMAGE_PIXELS = PILImage.MAX_IMAGE_PIXELS, None
    try:
        with PILImage.open(path) as im:
            im.draft("RGB", tuple(size))  # JPEG: decode at a fraction of the size
            if im.mode not in ("L", "LA", "RGB", "RGBA"):  # 1-bit, palette, 16-bit, CMYK
                im = im.convert("L" if im.mode in ("1", "I;16", "I") else "RGBA")
            small = im.resize(tuple(size), PILImage.Resampling.LANCZOS,
                              reducing_gap=2.0).convert("RGBA")
    finally:
        PILImage.MAX_IMAGE_PIXELS = saved
    return Image(small.width, small.height, small.tobytes())


def load_image(path) -> Image:
    path = _existing_file(path)
    data = np.fromfile(str(path), dtype=np.uint8)
    array = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if array is None:
        raise FieldError(f"{path}: not an image OpenCV can read (PNG, JPEG, TIFF, WebP...).",
                         field="image")
    rgba = np.ascontiguousarray(array_to_rgba8(array, str(path)))
    return Image(rgba.shape[1], rgba.shape[0], rgba.tobytes())


def save_image(path, image: Image) -> None:
    rgba = np.frombuffer(image.data, np.uint8).reshape(image.height, image.width, 4)
    if rgba[..., 3].min() == 255:
        out = cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGR)
    else:
        out = cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(path.suffix or ".png", out)
    if not ok:
        raise FieldError(f"{path}: cannot write this image type; use .png.", field="output")
    encoded.tofile(str(path))
