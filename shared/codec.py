"""Binary image frames: a fixed 36-byte header followed by raw RGBA8 pixels.

Layout (big-endian)::

    offset size field
    0      4    magic  b"CCIM"
    4      1    frame version (1)
    5      1    kind   1 = input (client -> server), 2 = result, 3 = preview
    6      1    pixel format (1 = RGBA8)
    7      1    reserved, must be 0
    8      4    slot   (u32) input slot / result index
    12     16   job id (the 16 bytes of the UUID whose hex is the job id)
    28     4    width  (u32)
    32     4    height (u32)
    36     ...  width * height * 4 bytes of pixels, no padding, no compression

Raw bytes on purpose: PNG costs ~125 ms per megapixel to encode, deflate ~200 ms
for 4 MiB (measured, see FACTS.md); a memcpy costs a few milliseconds.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

from .errors import FrameError, LimitError
from .images import CHANNELS, Image

MAGIC = b"CCIM"
FRAME_VERSION = 1
HEADER = struct.Struct(">4sBBBBI16sII")
HEADER_SIZE = HEADER.size  # 36

KIND_INPUT = 1
KIND_RESULT = 2
KIND_PREVIEW = 3
KIND_NAMES = {KIND_INPUT: "input", KIND_RESULT: "result", KIND_PREVIEW: "preview"}

FORMAT_RGBA8 = 1


@dataclass(frozen=True)
class Frame:
    kind: int
    job_id: str
    slot: int
    image: Image


def frame_job_id(head: bytes) -> Optional[str]:
    """The job id (hex) in a frame's header, or None when ``head`` is too short to hold
    one; nothing else is checked (for skipping the frames of a job already refused)."""
    if len(head) < HEADER_SIZE:
        return None
    return bytes(HEADER.unpack_from(head, 0)[6]).hex()


def encode_frame_parts(kind: int, job_id: str, slot: int, image: Image) -> Tuple[bytes, bytes]:
    """The frame as (header, pixels): sent as two websocket fragments of one message,
    so megabytes of pixels are never copied just to put 36 bytes in front of them."""
    if kind not in KIND_NAMES:
        raise ValueError(f"unknown frame kind {kind}")
    header = HEADER.pack(MAGIC, FRAME_VERSION, kind, FORMAT_RGBA8, 0, slot,
                         bytes.fromhex(job_id), image.width, image.height)
    return header, image.data


def encode_frame(kind: int, job_id: str, slot: int, image: Image) -> bytes:
    """The frame as one bytes object."""
    return b"".join(encode_frame_parts(kind, job_id, slot, image))


def decode_frame(data: Union[bytes, Sequence[bytes]], *, max_image_side: int,
                 max_pixels: int) -> Frame:
    """Parse and check one binary frame; every defect is a FrameError/LimitError.

    ``data`` is the whole message, or its fragments as received: when the first
    fragment is exactly the header, the pixel fragment is used without a copy.
    """
    pixels: Optional[bytes] = None
    if not isinstance(data, (bytes, bytearray, memoryview)):
        parts = list(data)
        if len(parts) == 2 and len(parts[0]) == HEADER_SIZE and isinstance(parts[1], bytes):
            data, pixels = parts[0], parts[1]
        else:
            data = b"".join(parts)
    if len(data) < HEADER_SIZE:
        raise FrameError(f"Binary frame of {len(data)} bytes is shorter than the "
                         f"{HEADER_SIZE}-byte image header.")
    magic, version, kind, fmt, reserved, slot, job, width, height = \
        HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise FrameError("Binary frame does not start with the ControlCanvas image magic "
                         "'CCIM'; send images only as ControlCanvas image frames.")
    if version != FRAME_VERSION:
        raise FrameError(f"Image frame version {version} is not supported (expected "
                         f"{FRAME_VERSION}); update the plug-in and the server together.")
    if kind not in KIND_NAMES:
        raise FrameError(f"Image frame kind {kind} is unknown.")
    if fmt != FORMAT_RGBA8:
        raise FrameError(f"Pixel format {fmt} is not supported; convert the layer to 8-bit "
                         f"RGBA before sending.")
    if reserved != 0:
        raise FrameError("Image frame header has a non-zero reserved byte.")
    if width == 0 or height == 0:
        raise FrameError(f"Image frame has an empty size {width}x{height}.")
    if width > max_image_side or height > max_image_side:
        raise LimitError(f"Image {width}x{height} exceeds the server's limit of "
                         f"{max_image_side} px per side; scale the canvas down or start the "
                         f"server with a larger --max-image-side.")
    if width * height > max_pixels:
        raise LimitError(f"Image {width}x{height} has {width * height} pixels, more than the "
                         f"server's limit of {max_pixels}; scale it down or raise --max-pixels.")
    expected = width * height * CHANNELS
    payload = len(pixels) if pixels is not None else len(data) - HEADER_SIZE
    if payload != expected:
        raise FrameError(f"Image frame says {width}x{height} RGBA8 ({expected} bytes) but "
                         f"carries {payload} bytes of pixels.")
    if pixels is None:
        pixels = bytes(data[HEADER_SIZE:])
    return Frame(kind, job.hex(), slot, Image(width, height, pixels))
