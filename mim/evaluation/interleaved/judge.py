"""A judge behind any OpenAI-compatible endpoint (GPT-4o, or a local judge served by vLLM): one request per
question, bounded retries, and a reply that cannot be read is a recorded failure, never a crash."""

from __future__ import annotations

import base64
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synth.redact import Redactor

PROMPTS = Path(__file__).resolve().parent / "prompts"


def judge_prompt(name: str, directory: str | os.PathLike[str] | None = None) -> str:
    """The judge prompt ``name`` (``prompts/NAME.txt``): ours, unless ``directory`` holds a file of that name
    (the benchmark's official wording, say)."""
    override = Path(directory) / f"{name}.txt" if directory else None
    return (override if override is not None and override.is_file() else PROMPTS / f"{name}.txt").read_text(
        encoding="utf-8")


#: What an image sent to a judge may be, by its first bytes (anything else is refused, not sent).
_IMAGE_MAGIC = {b"\x89PNG\r\n\x1a\n": "png", b"\xff\xd8\xff": "jpeg", b"GIF87a": "gif", b"GIF89a": "gif"}


@dataclass
class JudgeReply:
    text: str | None
    error: str | None = None

    def json(self) -> dict | None:
        """The reply's first JSON object (in a fenced block or not, words around it allowed), or None."""
        from synth.review.judge import reply_object

        return reply_object(self.text)


def image_data_url(image: Any, resize: tuple[int, int] | None = None) -> str:
    """A judge input image as a ``data:`` URL.

    A path is sent as its own bytes (PNG, JPEG or GIF; WebP re-encoded as PNG, as ISG's scorer does), unless
    ``resize`` is given: then it is decoded (under the pixel cap), resized and sent as JPEG, as OpenING's judge
    sends every image at 512 x 512. A PIL image is sent as PNG (or JPEG when resized)."""
    from PIL import Image

    from synth.data.images import decode_image_file

    if isinstance(image, (str, os.PathLike)):
        data = Path(image).read_bytes()
        if resize is None:
            kind = next((kind for magic, kind in _IMAGE_MAGIC.items() if data.startswith(magic)), None)
            if kind is not None:
                return f"data:image/{kind};base64," + base64.b64encode(data).decode()
        image = decode_image_file(image)  # WebP and anything else: decoded under the pixel cap, or refused
    if not isinstance(image, Image.Image):
        raise TypeError(f"a judge image is a path or a PIL image, not {type(image).__name__}")
    buffer = io.BytesIO()
    if resize is not None:
        image.convert("RGB").resize(resize).save(buffer, format="JPEG")
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class Judge:
    """Asks an OpenAI-compatible chat endpoint. The key is read from ``api_key_env`` and nowhere else.

    Args:
        model: the judge model's name at the endpoint (``gpt-4o``, ``openai/gpt-4.1``, a vLLM model).
        base_url: the endpoint (default: OpenAI's).
        api_key_env: the environment variable holding the key.
        max_tokens: tokens per reply unless a question asks for fewer.
        temperature: 0 by default, so a rerun judges alike (OpenING's and ISG's scripts leave the API default).
        retries: attempts per question; 4xx answers other than 408/409/429 are not retried.
        timeout: seconds per request.
        json_mode: send ``response_format: json_object`` where a JSON reply is wanted (ISG's scorer does; not
            every local server accepts it).
    """

    def __init__(self, model: str, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 max_tokens: int = 512, temperature: float = 0.0, retries: int = 3, timeout: float = 120.0,
                 json_mode: bool = False) -> None:
        from openai import OpenAI

        key = os.environ.get(api_key_env)
        if key is None and base_url is None:
            raise ValueError(f"set the judge's API key in {api_key_env}, or give judge base_url for a local judge")
        self.redact = Redactor([key] if key else [])
        self.client = OpenAI(api_key=key or "unused", base_url=base_url, timeout=timeout, max_retries=0)
        self.model, self.max_tokens, self.temperature = model, max_tokens, temperature
        self.retries, self.json_mode = max(1, retries), json_mode

    def ask(self, content: list[dict], system: str | None = None, max_tokens: int | None = None,
            want_json: bool = False) -> JudgeReply:
        import openai

        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
        extra = {"response_format": {"type": "json_object"}} if want_json and self.json_mode else {}
        error = "not asked"
        for attempt in range(self.retries):
            try:
                response = self.client.chat.completions.create(
                    model=self.model, messages=messages, max_tokens=max_tokens or self.max_tokens,
                    temperature=self.temperature, **extra)
                choices = getattr(response, "choices", None)
                text = getattr(choices[0].message, "content", None) if choices else None
                if isinstance(text, str):
                    return JudgeReply(text)
                error = "the reply had no message content"
            except openai.APIStatusError as failure:
                error = f"HTTP {failure.status_code}: {failure.message}"
                if failure.status_code < 500 and failure.status_code not in (408, 409, 429):
                    break  # the request itself is wrong: asking again will not help
            except (openai.OpenAIError, json.JSONDecodeError, AttributeError, IndexError) as failure:
                error = f"{type(failure).__name__}: {failure}"
            if attempt + 1 < self.retries:
                time.sleep(min(2 ** attempt, 8) * 0.1)
        return JudgeReply(None, self.redact(error))
