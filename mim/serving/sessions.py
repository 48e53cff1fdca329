"""The demo's conversations: server-issued (signed) ids, idle expiry, and caps per client, in total and on
the pixels their images hold, so that no client can push out the others or fill the server's memory."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mim.serving.requests import RequestError


def held_pixels(chat: Any) -> int:
    """Pixels of the images a conversation keeps (uploaded and drawn, in its history)."""
    return sum(image.size[0] * image.size[1] for message in getattr(chat, "history", []) or []
               for image in message.get("images", []) or [] if hasattr(image, "size"))


@dataclass
class _Session:
    chat: Any
    client: str
    last_used: float
    turns: int = 0
    pixels: int = 0  # what its images hold (held_pixels), counted against the server's max_held_pixels


@dataclass
class SessionStore:
    """Conversations by server-issued session id, with idle expiry and per-client and total caps."""

    make_chat: Callable[[], Any]
    max_sessions: int = 64
    max_sessions_per_client: int = 8
    idle_seconds: float = 3600.0
    clock: Callable[[], float] = time.monotonic
    sessions: OrderedDict[str, _Session] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        if self.max_sessions < 1 or self.max_sessions_per_client < 1:
            raise ValueError("max_sessions and max_sessions_per_client must be at least 1")
        self._secret = secrets.token_bytes(32)

    def _sign(self, token: str) -> str:
        return hmac.new(self._secret, token.encode(), hashlib.sha256).hexdigest()[:32]

    def issued_here(self, session_id: str | None) -> bool:
        """Whether this server (since its start) issued the id: a forged or foreign id is not."""
        if not session_id or session_id.count(".") != 1:
            return False
        token, signature = session_id.split(".")
        return hmac.compare_digest(signature, self._sign(token))

    def _expire(self) -> None:
        now = self.clock()
        for session_id in [k for k, v in self.sessions.items() if now - v.last_used > self.idle_seconds]:
            del self.sessions[session_id]

    def get(self, session_id: str | None, client: str) -> tuple[str, _Session, str | None]:
        """(id, session, notice): the caller's conversation, or a new one with a notice saying why
        the old one is gone. Raises RequestError(503) when the server holds all it may."""
        self._expire()
        session = self.sessions.get(session_id) if session_id else None
        if session is not None:
            session.last_used = self.clock()
            self.sessions.move_to_end(session_id)
            return session_id, session, None
        notice = None
        if self.issued_here(session_id):
            notice = ("Your earlier conversation is no longer held (idle too long, or the server needed room); "
                      "this message starts a new one.")
        own = [k for k, v in self.sessions.items() if v.client == client]
        if len(own) >= self.max_sessions_per_client:
            del self.sessions[own[0]]  # this client's least recently used conversation, never another's
        elif len(self.sessions) >= self.max_sessions:
            raise RequestError(503, f"the demo is holding its maximum of {self.max_sessions} conversations; "
                                    "try again in a few minutes")
        token = secrets.token_hex(16)
        session_id = f"{token}.{self._sign(token)}"
        session = self.sessions[session_id] = _Session(self.make_chat(), client, self.clock())
        return session_id, session, notice

    def drop(self, session_id: str | None) -> None:
        self.sessions.pop(session_id, None)

    def trim_pixels(self, max_pixels: int, keep: str) -> int:
        """Forget the least recently used conversations (never ``keep``) until their images fit
        ``max_pixels``; they are told so on their next message. Returns how many were dropped."""
        dropped = 0
        for session_id in list(self.sessions):
            if sum(session.pixels for session in self.sessions.values()) <= max_pixels:
                break
            if session_id != keep:
                del self.sessions[session_id]
                dropped += 1
        return dropped
