"""Keep secrets out of everything the pipeline writes or prints.

A misconfigured proxy or a chatty error page can echo the request's
``Authorization`` header back in its body, and that body ends up in an error
message. Every generation record and every error string passes through a
:class:`Redactor` before it reaches a file, a log line or the terminal.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

REDACTED = "[REDACTED]"
#: Credential shapes worth hiding even when they are not our key: bearer tokens and OpenAI-style keys.
_PATTERNS = (
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{6,}"),
    re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"),
)


class Redactor:
    """Replaces the given secrets, and anything shaped like a bearer token or API key, with [REDACTED]."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        # very short "secrets" (the placeholder key "unused" for local servers) would redact ordinary words
        self.secrets = sorted({s for s in secrets if s and len(s) >= 8}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        for pattern in _PATTERNS:
            text = pattern.sub(REDACTED, text)
        return text
