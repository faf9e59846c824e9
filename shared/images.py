"""A plain RGBA8 image value that both editors and the backend understand.

No numpy and no Qt here: plug-ins bundle this file into editors whose Python has
neither guaranteed.  Pixels are straight (not premultiplied) RGBA, 8 bits per
channel, rows top to bottom, stride = 4 * width.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import FieldError

CHANNELS = 4


@dataclass(frozen=True)
class Image:
    width: int
    height: int
    data: bytes

    def __post_init__(self) -> None:
        for name in ("width", "height"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise FieldError(f"Image {name} must be a positive integer, got {value!r}.",
                                 field=name)
        if not isinstance(self.data, (bytes, bytearray, memoryview)):
            raise FieldError("Image data must be bytes.", field="data")
        if not isinstance(self.data, bytes):
            object.__setattr__(self, "data", bytes(self.data))
        expected = self.width * self.height * CHANNELS
        if len(self.data) != expected:
            raise FieldError(
                f"Image data has {len(self.data)} bytes but {self.width}x{self.height} RGBA8 "
                f"needs exactly {expected}.", field="data")

    def __repr__(self) -> str:  # never dump megabytes into a log line
        return f"Image({self.width}x{self.height} RGBA8)"

    @property
    def size(self) -> tuple:
        return (self.width, self.height)

    @classmethod
    def filled(cls, width: int, height: int, rgba=(0, 0, 0, 0)) -> "Image":
        return cls(width, height, bytes(rgba) * (width * height))

    @classmethod
    def from_bgra(cls, width: int, height: int, data: bytes) -> "Image":
        """Build from BGRA8 bytes (Krita's 8-bit RGBA pixelData order)."""
        return cls(width, height, swap_red_blue(data))

    def to_bgra(self) -> bytes:
        return swap_red_blue(self.data)

    def pixel(self, x: int, y: int) -> tuple:
        i = (y * self.width + x) * CHANNELS
        return tuple(self.data[i:i + CHANNELS])

    def crop(self, x: int, y: int, width: int, height: int) -> "Image":
        if x < 0 or y < 0 or width <= 0 or height <= 0 or x + width > self.width \
                or y + height > self.height:
            raise FieldError(f"Crop {width}x{height}+{x}+{y} lies outside the "
                             f"{self.width}x{self.height} image.", field="crop")
        stride = self.width * CHANNELS
        start = x * CHANNELS
        rows = [self.data[(y + r) * stride + start:(y + r) * stride + start + width * CHANNELS]
                for r in range(height)]
        return Image(width, height, b"".join(rows))

    def is_transparent(self) -> bool:
        """True when every pixel has alpha 0 (an empty layer)."""
        alpha = self.data[3::CHANNELS]
        return alpha.count(0) == len(alpha)


def swap_red_blue(data: bytes) -> bytes:
    """RGBA <-> BGRA in one pass over the buffer (slice assignment runs in C)."""
    out = bytearray(data)
    out[0::4] = data[2::4]
    out[2::4] = data[0::4]
    return bytes(out)
