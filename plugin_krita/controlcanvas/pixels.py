"""Pixel conversions between Krita's buffers and the protocol's RGBA8 images.

Pure Python (bytes slicing runs in C).  Krita's ``pixelData`` for an 8-bit RGBA
layer is BGRA; a selection's ``pixelData`` is one byte per pixel (0..255).
"""

from __future__ import annotations

from typing import Optional, Tuple

from .proto import Image


class PixelError(ValueError):
    """The document's pixels cannot be used as they are; the message says why."""


def image_from_bgra(width: int, height: int, data: bytes) -> Image:
    expected = width * height * 4
    if len(data) != expected:
        raise PixelError(f"Krita returned {len(data)} bytes for {width}x{height} pixels; "
                         f"8-bit RGBA needs {expected}.")
    return Image.from_bgra(width, height, bytes(data))


def depth_note(color_model: str, color_depth: str) -> Optional[str]:
    """None for 8-bit RGBA; a note for 16-bit RGBA (converted both ways); else refused."""
    if color_model == "RGBA" and color_depth == "U8":
        return None
    if color_model == "RGBA" and color_depth == "U16":
        return ("This document is 16-bit: ControlCanvas sends an 8-bit copy of the pixels and "
                "its results have 8-bit precision.")
    raise PixelError(f"ControlCanvas works on RGB/Alpha 8- or 16-bit integer documents, not "
                     f"{color_model} {color_depth}; convert it with Image > Convert Image Color "
                     f"Space (RGB/Alpha, 8-bit integer), or work on a converted copy.")


def to_u8(data: bytes, color_depth: str) -> bytes:
    """Krita BGRA of the document's depth (U8 or U16 little-endian) to BGRA U8."""
    if color_depth == "U8":
        return bytes(data)
    if color_depth == "U16":
        return bytes(data[1::2])  # the high byte of each channel
    raise PixelError(f"Cannot convert {color_depth} pixels.")


def from_u8(data: bytes, color_depth: str) -> bytes:
    """BGRA U8 to Krita BGRA of the document's depth (U16: v * 257, little-endian)."""
    if color_depth == "U8":
        return bytes(data)
    if color_depth == "U16":
        out = bytearray(len(data) * 2)
        out[0::2] = data
        out[1::2] = data
        return bytes(out)
    raise PixelError(f"Cannot convert {color_depth} pixels.")


def mask_image(width: int, height: int, selection: bytes) -> Image:
    """A 1-byte-per-pixel selection as an opaque RGBA mask (white = change)."""
    if len(selection) != width * height:
        raise PixelError(f"The selection has {len(selection)} bytes for {width}x{height} "
                         f"pixels; expected one byte per pixel.")
    out = bytearray(width * height * 4)
    out[0::4] = selection
    out[1::4] = selection
    out[2::4] = selection
    out[3::4] = b"\xff" * (width * height)
    return Image(width, height, bytes(out))


def selection_bbox(width: int, height: int,
                   selection: bytes) -> Optional[Tuple[int, int, int, int]]:
    """(x, y, w, h) of the selected pixels, None when nothing is selected."""
    rows = [y for y in range(height) if selection[y * width:(y + 1) * width].strip(b"\x00")]
    if not rows:
        return None
    x0, x1 = width, 0
    for y in rows:
        row = selection[y * width:(y + 1) * width]
        left = len(row) - len(row.lstrip(b"\x00"))
        right = len(row.rstrip(b"\x00"))
        x0, x1 = min(x0, left), max(x1, right)
    return (x0, rows[0], x1 - x0, rows[-1] + 1 - rows[0])


def crop_plane(data: bytes, width: int, box: Tuple[int, int, int, int]) -> bytes:
    """Crop a 1-byte-per-pixel plane."""
    x, y, w, h = box
    return b"".join(data[(y + r) * width + x:(y + r) * width + x + w] for r in range(h))


def apply_mask_alpha(image: Image, mask: bytes) -> Image:
    """Multiply the image's alpha by a 1-byte-per-pixel mask of the same size, so a
    result changes only selected pixels (soft edges stay soft)."""
    if len(mask) != image.width * image.height:
        raise PixelError("The mask does not match the result's size.")
    out = bytearray(image.data)
    alpha = image.data[3::4]
    if alpha.count(255) == len(alpha):
        out[3::4] = mask
    else:
        out[3::4] = bytes(a * m // 255 for a, m in zip(alpha, mask))
    return Image(image.width, image.height, bytes(out))


def scale_nearest(image: Image, width: int, height: int) -> Image:
    """Nearest-neighbour resize (previews and results the server returned at another size)."""
    if image.size == (width, height):
        return image
    src = image.data
    sw, sh = image.width, image.height
    xs = [min(sw - 1, x * sw // width) * 4 for x in range(width)]
    rows = []
    for y in range(height):
        base = min(sh - 1, y * sh // height) * sw * 4
        row = bytearray(width * 4)
        for i, sx in enumerate(xs):
            row[i * 4:i * 4 + 4] = src[base + sx:base + sx + 4]
        rows.append(bytes(row))
    return Image(width, height, b"".join(rows))
