"""shared.codec and shared.images: the binary layout, checked with literal bytes."""

import struct

import pytest

from shared import codec
from shared.errors import FieldError, FrameError, LimitError
from shared.images import Image, swap_red_blue

JOB = "00112233445566778899aabbccddeeff"
LIMITS = dict(max_image_side=64, max_pixels=64 * 32)


def literal_frame(*, magic=b"CCIM", version=1, kind=1, fmt=1, reserved=0, slot=2,
                  job=bytes.fromhex(JOB), width=2, height=1, pixels=b"\x01\x02\x03\x04" * 2):
    return (magic + bytes([version, kind, fmt, reserved]) + struct.pack(">I", slot) + job
            + struct.pack(">II", width, height) + pixels)


def test_header_layout_is_exactly_as_documented():
    image = Image(2, 1, b"\x01\x02\x03\x04\x05\x06\x07\x08")
    data = codec.encode_frame(codec.KIND_INPUT, JOB, 2, image)
    assert data == (b"CCIM\x01\x01\x01\x00" b"\x00\x00\x00\x02" + bytes.fromhex(JOB)
                    + b"\x00\x00\x00\x02\x00\x00\x00\x01" + image.data)
    assert codec.HEADER_SIZE == 36


def test_decode_literal_frame():
    frame = codec.decode_frame(literal_frame(), **LIMITS)
    assert (frame.kind, frame.job_id, frame.slot) == (1, JOB, 2)
    assert frame.image == Image(2, 1, b"\x01\x02\x03\x04" * 2)


def test_fragments_decode_without_copying_pixels():
    image = Image(4, 4, bytes(range(64)))
    header, pixels = codec.encode_frame_parts(codec.KIND_RESULT, JOB, 0, image)
    assert pixels is image.data
    frame = codec.decode_frame((header, pixels), **LIMITS)
    assert frame.image.data is pixels
    # arbitrary fragmentation still decodes
    whole = header + pixels
    assert codec.decode_frame([whole[:5], whole[5:40], whole[40:]], **LIMITS).image == image


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(magic=b"PNG\x89"), FrameError, "magic"),
    (dict(version=2), FrameError, "version"),
    (dict(kind=9), FrameError, "kind"),
    (dict(fmt=2), FrameError, "8-bit RGBA"),
    (dict(reserved=1), FrameError, "reserved"),
    (dict(width=0), FrameError, "empty"),
    (dict(width=3), FrameError, "carries 8 bytes"),
    (dict(pixels=b"\x00" * 7), FrameError, "carries 7 bytes"),
    (dict(width=65, height=1, pixels=b"\x00" * 260), LimitError, "per side"),
    (dict(width=64, height=33, pixels=b""), LimitError, "pixels"),
    (dict(width=2**32 - 1, height=2**32 - 1, pixels=b""), LimitError, "per side"),
])
def test_bad_frames(kwargs, error, words):
    with pytest.raises(error) as info:
        codec.decode_frame(literal_frame(**kwargs), **LIMITS)
    assert words in info.value.message


@pytest.mark.parametrize("cut", [0, 1, 4, 35])
def test_truncated_header(cut):
    with pytest.raises(FrameError, match="shorter"):
        codec.decode_frame(literal_frame()[:cut], **LIMITS)


def test_image_checks_size():
    with pytest.raises(FieldError, match="needs exactly 16"):
        Image(2, 2, b"\x00" * 15)
    with pytest.raises(FieldError):
        Image(0, 2, b"")
    with pytest.raises(FieldError):
        Image(True, 1, b"\x00" * 4)


def test_bgra_conversion():
    bgra = bytes([10, 20, 30, 255, 1, 2, 3, 4])
    image = Image.from_bgra(2, 1, bgra)
    assert image.pixel(0, 0) == (30, 20, 10, 255)
    assert image.pixel(1, 0) == (3, 2, 1, 4)
    assert image.to_bgra() == bgra
    assert swap_red_blue(swap_red_blue(bgra)) == bgra


def test_crop_and_transparency():
    data = bytes(range(4 * 3 * 4))
    image = Image(4, 3, data)
    assert image.crop(1, 1, 2, 2).data == data[20:28] + data[36:44]
    with pytest.raises(FieldError):
        image.crop(3, 0, 2, 1)
    assert Image.filled(3, 3).is_transparent()
    assert not Image(1, 1, b"\x00\x00\x00\x01").is_transparent()


def test_repr_is_short():
    assert repr(Image.filled(1000, 1000)) == "Image(1000x1000 RGBA8)"


def test_frame_job_id_reads_the_header_only():
    job = "ab" * 16
    head, _ = codec.encode_frame_parts(codec.KIND_INPUT, job, 3, Image.filled(2, 2))
    assert codec.frame_job_id(head) == job
    assert codec.frame_job_id(head + b"pixels") == job
    assert codec.frame_job_id(head[:codec.HEADER_SIZE - 1]) is None
