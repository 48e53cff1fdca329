"""What every synthesis backend returns and raises: the contract between ``synth generate`` and the
backends (an endpoint, the offline composer, a model in this process)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    model: str
    finish_reason: str = "stop"  # "length": the reply ran out of max_tokens (OpenAI's field)
    meta: dict = field(default_factory=dict)  # more fields for the generation record (the world's answer keys)


class BackendError(Exception):
    """One failed attempt. ``retryable``: rate limits, server errors, timeouts, broken
    connections and malformed replies are; bad requests and authentication are not.
    ``fatal``: no later request can succeed either (a refused key, a model the endpoint does
    not have), so the run stops at once instead of failing every group in turn."""

    def __init__(self, message: str, retryable: bool, retry_after: float | None = None, fatal: bool = False):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after
        self.fatal = fatal

#: HTTP statuses after which every further request would fail the same way.
FATAL_STATUSES = {401: "the endpoint refused the API key", 403: "the key may not use this model or endpoint",
                  404: "the endpoint has no such model or path (check generate.model and generate.base_url)"}


class ChatBackend(Protocol):
    """``constraint`` (a :class:`~synth.generation.structured.Constraint`) is passed only when the run asks for
    structured generation; a backend that cannot honour one raises a non-retryable :class:`BackendError`.
    A backend with ``uses_group = True`` (the world's composer) is also given ``group``, the image group."""

    name: str

    async def complete(self, prompt: str, captions: Sequence[str], seed: int, constraint=None) -> Completion: ...

    async def close(self) -> None: ...
