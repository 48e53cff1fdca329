"""Decode untrusted image bytes with a pixel limit, so a bad file is an error, never a dead process.

Every place that opens an image it did not make goes through :func:`decode_image`:
ingest (web-scraped pairs), the score stage, training, ``MIMChat`` and the web
demo's uploads. The pixel count is read from the header and checked *before*
any pixel is decoded, so a 219 KB PNG that claims 13000 x 13000 pixels costs a
header read, not 3 GB of RAM. The image is then decoded in full, so a
truncated JPEG fails here (``Image.verify`` does not decode JPEG data and lets
it through).

Pillow refuses images over twice ``PIL.Image.MAX_IMAGE_PIXELS`` (about 179 M
pixels) on its own; a ``max_pixels`` above that also needs Pillow's limit raised.
"""

from __future__ import annotations

import io
import struct
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

#: Pillow's own default limit (``PIL.Image.MAX_IMAGE_PIXELS``), about 9459 x 9459.
DEFAULT_MAX_PIXELS = 89_478_485


class ImageDecodeError(OSError):
    """Bytes that are not a usable image. ``reason`` is a short rule name for counting rejections."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _decode_errors() -> tuple[type[BaseException], ...]:
    from PIL import Image

    # What Pillow's decoders raise on hostile or damaged input (besides MemoryError, which is not ours to hide).
    return (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error, zlib.error,
            Image.DecompressionBombError)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image"):
    """The image in ``data`` as a fully decoded RGB ``PIL.Image``.

    Raises :class:`ImageDecodeError` with reason ``too_many_pixels`` (the header
    claims more than ``max_pixels``) or ``unreadable_image`` (not an image, or
    damaged: truncated, corrupt, unsupported); ``name`` goes into the message.
    """
    from PIL import Image, UnidentifiedImageError

    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError("too_many_pixels", f"{name} is {width} x {height} = {width * height:,} "
                                                          f"pixels, over the limit of {max_pixels:,}")
            image.load()  # decodes every pixel: truncated or corrupt data fails here
            return image.convert("RGB")
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("unreadable_image", f"{name} is not an image format Pillow can identify") from None
    except Image.DecompressionBombError:
        raise ImageDecodeError("too_many_pixels", f"{name} claims more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels "
                                                  f"(Pillow refuses to open it), over the limit of {max_pixels:,}"
                               ) from None
    except _decode_errors() as error:
        raise ImageDecodeError("unreadable_image", f"{name} cannot be decoded: {error}") from None


def decode_image_file(path, max_pixels: int = DEFAULT_MAX_PIXELS):
    """:func:`decode_image` for a file; a missing or unreadable file is an ``OSError`` naming it."""
    with open(path, "rb") as handle:
        data = handle.read()
    return decode_image(data, max_pixels, str(path))


def pixels_claimed(data: bytes) -> int:
    """Width x height from the header alone (0 when there is none: :func:`decode_image` then says why)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as probe:
            return probe.size[0] * probe.size[1]
    except Exception:  # noqa: BLE001 - not an image: decode_image reports it with its reason
        return 0


class PixelBudget:
    """Pixels that may be held decoded at once, across threads (download workers, a server's requests). An image larger than the budget still decodes, alone."""

    def __init__(self, pixels: int) -> None:
        if pixels < 1:
            raise ValueError(f"the pixel budget must be positive, got {pixels}")
        self.pixels = pixels
        self.in_use = 0
        self.peak = 0
        self._condition = threading.Condition()

    @contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: self.in_use == 0 or self.in_use + pixels <= self.pixels)
            self.in_use += pixels
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            with self._condition:
                self.in_use -= pixels
                self._condition.notify_all()


class DecodePool:
    """Where untrusted images are decoded when many threads receive them: a few decoding threads under a
    shared :class:`PixelBudget`. Few threads matter as much as the budget: glibc gives each thread its own
    malloc arena and keeps the freed pixel buffers there, so sixteen threads that each decoded one
    9000 x 9000 image hold gigabytes long after (measured: 7.1 GB with the budget alone, 16 download
    threads; benchmarks/hostile_memory.py)."""

    def __init__(self, pixels: int, threads: int = 2) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.budget = PixelBudget(pixels)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")

    def run(self, data: bytes, work, *args):
        """``work(*args)`` on a decoding thread, once the pixels ``data`` claims fit the budget."""
        def reserved():
            with self.budget.reserve(pixels_claimed(data)):
                return work(*args)

        return self._pool.submit(reserved).result()

    def close(self) -> None:
        self._pool.shutdown(wait=False)
