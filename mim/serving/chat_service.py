"""The web demo's chat, apart from HTTP: message limits, server-held sessions, the model queue.

Sessions: the server issues every session id (signed, so a client cannot choose one) when a browser first
chats. A conversation is forgotten after ``session_idle_seconds`` without a message, and the browser is told
so. At most ``max_sessions`` conversations are held; a client address holds at most
``max_sessions_per_client`` (its own oldest goes first), so no client can push out the others; when the
server is full, new conversations get a 503 until one expires.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from mim.serving.requests import ModelQueue, RequestError, data_url_bytes, decode_upload, png_data_url
from mim.serving.sessions import SessionStore, held_pixels
from synth.data.images import DecodePool


class ChatService:
    """The demo's logic, apart from HTTP: limits, sessions, one generation at a time."""

    def __init__(self, make_chat, max_sessions: int = 64, max_text_chars: int = 4000, max_images: int = 4,
                 max_request_bytes: int = 16 * 1024 * 1024, max_image_pixels: int = 16_777_216,
                 max_sessions_per_client: int = 8, session_idle_seconds: float = 3600.0, max_turns: int = 20,
                 max_waiting: int = 16, wait_seconds: float = 600.0, clock: Callable[[], float] = time.monotonic,
                 max_image_side: int = 512, max_held_pixels: int = 200_000_000,
                 decode_budget_pixels: int = 64_000_000, queue: ModelQueue | None = None):
        self.store = SessionStore(make_chat, max_sessions, max_sessions_per_client, session_idle_seconds, clock)
        self.max_image_side, self.max_held_pixels = max_image_side, max_held_pixels
        self.decoder = DecodePool(decode_budget_pixels, threads=2)  # what requests may decode at once, where
        self.max_text_chars, self.max_images = max_text_chars, max_images
        self.max_request_bytes, self.max_image_pixels = max_request_bytes, max_image_pixels
        self.max_turns = max_turns
        self.queue = queue or ModelQueue(max_waiting, wait_seconds)
        self.sessions_lock = threading.Lock()  # the store; held briefly

    def reply(self, session_id: str | None, client: str, payload: dict) -> tuple[str, dict]:
        """(session id, response body) for one chat message; RequestError for what the client must fix."""
        from mim.inference.interleaved import ImagePart

        text, images = payload.get("text", ""), payload.get("images") or []
        if not isinstance(text, str) or not isinstance(images, list):
            raise RequestError(400, "send {\"text\": string, \"images\": [image data URLs]}")
        if len(text) > self.max_text_chars:
            raise RequestError(400, f"the message is {len(text)} characters; the limit is {self.max_text_chars}")
        if len(images) > self.max_images:
            raise RequestError(400, f"{len(images)} images attached; the limit is {self.max_images}")
        if not text.strip() and not images:
            raise RequestError(400, "the message is empty")
        uploads = [data_url_bytes(image, f"image {index + 1}") for index, image in enumerate(images)]
        with self.queue.place():
            decoded = [decode_upload(data, f"image {index + 1}", self.max_image_pixels, self.max_image_side,
                                     self.decoder) for index, data in enumerate(uploads)]
            del uploads
            with self.queue.turn():
                with self.sessions_lock:
                    session_id, session, notice = self.store.get(session_id, client)
                if session.turns >= self.max_turns:
                    raise RequestError(400, f"this conversation has reached {self.max_turns} turns; start a new one "
                                            "(New conversation)")
                try:
                    result = session.chat.send(text, decoded)
                except (ValueError, OSError) as error:  # the chat's own checks: a message it cannot take
                    raise RequestError(400, str(error)) from None
                session.turns += 1
                session.pixels = held_pixels(session.chat)
                with self.sessions_lock:
                    self.store.trim_pixels(self.max_held_pixels, keep=session_id)
        parts = [{"type": "image", "src": png_data_url(p.image), "caption": p.caption} if isinstance(p, ImagePart)
                 else {"type": "text", "text": p.text} for p in result.parts]
        body = {"parts": parts}
        if notice:
            body["notice"] = notice
        return session_id, body

    def reset(self, session_id: str | None) -> None:
        with self.sessions_lock:
            self.store.drop(session_id)
