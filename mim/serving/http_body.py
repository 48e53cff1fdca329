"""Request bodies read under limits, on the event loop: a size limit checked before and while reading, a
deadline for the whole body and for each silence, so a client that sends half a body or trickles it costs
one waiting coroutine for a bounded time and gets a 408, and one that sends too much gets its 413."""

from __future__ import annotations

import asyncio
import json
import time

from starlette.requests import ClientDisconnect, Request

from mim.serving.requests import RequestError

#: A body over the limit is read and thrown away up to this many times the limit, so the client, still
#: sending, receives the 413 instead of a broken pipe; past that the connection is closed after the answer.
DISCARD_FACTOR = 4


async def _chunks(request: Request, idle_seconds: float, deadline: float, received: list[int]):
    stream = request.stream().__aiter__()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RequestError(408, f"the request body did not arrive in time ({received[0]:,} bytes so far)")
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), min(idle_seconds, left))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            if time.monotonic() >= deadline:
                raise RequestError(408, f"the request body did not arrive in time ({received[0]:,} bytes so far)"
                                   ) from None
            raise RequestError(408, f"the client stopped sending ({received[0]:,} bytes so far)") from None
        except ClientDisconnect:
            raise RequestError(400, f"the client left after {received[0]:,} bytes") from None
        received[0] += len(chunk)
        yield chunk


async def read_body(request: Request, limit: int, idle_seconds: float = 30.0, body_seconds: float = 60.0) -> bytes:
    """The whole body, at most ``limit`` bytes. A length must be declared (``Content-Length``) or the body
    chunked; either way the limit holds for what actually arrives."""
    raw = request.headers.get("content-length")
    chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
    if raw is None and not chunked:
        raise RequestError(411, "the request needs a Content-Length header (or a chunked body)")
    if raw is not None and not raw.strip().isdigit():
        raise RequestError(400, f"Content-Length must be a non-negative whole number, got {raw[:40]!r}")
    deadline = time.monotonic() + body_seconds
    received = [0]
    too_large = (f"the request is {{size}}; the limit is {limit / 2**20:.2f} MiB (smaller images?)")
    if raw is not None and int(raw) > limit:
        length = int(raw)
        if length <= DISCARD_FACTOR * limit:
            try:
                async for _ in _chunks(request, idle_seconds, deadline, received):
                    pass
            except RequestError:
                pass  # the 413 is the answer either way
        raise RequestError(413, too_large.format(size=f"{length / 2**20:.2f} MiB"), code="request_too_large")
    pieces = []
    async for chunk in _chunks(request, idle_seconds, deadline, received):
        if received[0] > limit:
            raise RequestError(413, too_large.format(size=f"over {received[0] / 2**20:.2f} MiB"),
                               code="request_too_large")
        pieces.append(chunk)
    return b"".join(pieces)


def parse_json(body: bytes) -> dict:
    """A JSON object, or the 400 that says what the body is instead."""
    try:
        payload = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError(400, "the request body is not JSON") from None
    except RecursionError:
        raise RequestError(400, "the request body is nested too deeply") from None
    if not isinstance(payload, dict):
        raise RequestError(400, "the request body must be a JSON object")
    return payload
