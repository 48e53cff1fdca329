"""What both of ``mim serve``'s APIs share: the error a client must fix, images in and out as data URLs
(decoded under a pixel budget, kept small), and the one queue in front of the model."""

from __future__ import annotations

import base64
import binascii
import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from synth.data.images import DecodePool, ImageDecodeError, decode_image


class RequestError(ValueError):
    """A request the server will not serve, with the HTTP status and a message for the client.
    ``param`` and ``code`` fill OpenAI's error fields on the ``/v1`` API."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def data_url_bytes(data_url: Any, where: str) -> bytes:
    """The bytes of an image ``data:`` URL (``where`` names it in the error: "image 2")."""
    if not isinstance(data_url, str) or "," not in data_url or not data_url.startswith("data:image/"):
        raise RequestError(400, f"{where} is not an image data URL")
    header, payload = data_url.split(",", 1)
    if not header.endswith(";base64"):
        raise RequestError(400, f"{where} is a data URL without ;base64")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{where} is not valid base64") from None


def decode_upload(data: bytes, where: str, max_pixels: int, max_side: int, pool: DecodePool | None = None):
    """Decode (on the pool's few threads, under its pixel budget), then keep only a copy at most ``max_side``
    on its longer side (the vision tower reads 224 px): a session holds small images, whatever was uploaded."""
    from PIL import Image

    def work():
        image = decode_image(data, max_pixels, where)
        if max(image.size) > max_side:
            image.thumbnail((max_side, max_side), Image.LANCZOS)
        return image

    try:
        return pool.run(data, work) if pool is not None else work()
    except ImageDecodeError as error:
        raise RequestError(400, str(error)) from None


def png_data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class ModelQueue:
    """One generation at a time, at most ``max_waiting`` requests in line behind it, each for at most
    ``wait_seconds``; the rest are told 503 at once. Both APIs stand in the same line."""

    def __init__(self, max_waiting: int = 16, wait_seconds: float = 600.0) -> None:
        self.max_waiting, self.wait_seconds = max_waiting, wait_seconds
        self.generation = threading.Lock()  # the model; held for a whole reply
        self.places = threading.BoundedSemaphore(max_waiting + 1)  # the one generating plus those in line

    @contextmanager
    def place(self) -> Iterator[None]:
        """A place in line, taken without waiting (before any image is decoded: an overload costs nothing)."""
        if not self.places.acquire(blocking=False):
            raise RequestError(503, "the server is busy with other requests; try again in a moment",
                               code="server_busy")
        try:
            yield
        finally:
            self.places.release()

    @contextmanager
    def turn(self) -> Iterator[None]:
        """The model, once the requests ahead are done (503 after ``wait_seconds``)."""
        if not self.generation.acquire(timeout=self.wait_seconds):
            raise RequestError(503, f"the server is busy (waited {self.wait_seconds:.0f} s); try again later",
                               code="server_busy")
        try:
            yield
        finally:
            self.generation.release()
