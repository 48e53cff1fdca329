"""Hostile and damaged images, made by the tests themselves."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def claimed_png(width: int, height: int) -> bytes:
    """A PNG of a few hundred bytes whose header claims width x height pixels: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096, 9)) + \
        chunk(b"IEND", b"")


def truncated_jpeg(seed: int = 0, size: int = 64) -> bytes:
    """A JPEG cut in the middle of its entropy-coded data: Image.verify() accepts it, decoding fails."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
        buffer, "JPEG", quality=95)
    data = buffer.getvalue()
    return data[:len(data) // 2]
