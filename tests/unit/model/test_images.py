"""Image bytes that clients register never fail a swap or a training step."""
from __future__ import annotations

import struct
import zlib

import pytest

from em3.data.images import sample_photos
from em3.model.encoders import decode_image


def _png_declaring(width: int, height: int) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1) * 4)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("data", [
    _png_declaring(60_000, 60_000),  # 600 bytes declaring 3.6 G pixels: PIL raises DecompressionBombError
    _png_declaring(5_000, 5_000),    # under PIL's own limit, over ours: would decode 75 MB per item
    b"\x89PNG not really",
    b"",
])
def test_hostile_or_broken_images_count_as_missing(data):
    assert decode_image(data, 64) is None


def test_a_real_photo_still_decodes():
    out = decode_image(sample_photos()[0], 64)
    assert out is not None and tuple(out.shape) == (3, 64, 64)
