"""OpenAI's chat-completions protocol for MIM, apart from HTTP: a request body checked and turned into MIM's
conversation, and a reply turned into a completion, a stream chunk, or an error, in OpenAI's shapes.

What goes in: ``messages`` with ``role`` system / developer / user / assistant and ``content`` a string or a
list of parts (``{"type": "text", "text"}``, ``{"type": "image_url", "image_url": {"url"}}``). An image is a
``data:`` URL; an ``http(s)`` URL only where the server was started with ``allow_remote_images`` (and then
only a public address, see :mod:`synth.data.safe_fetch`). A literal ``<image>`` typed in text stays text.

What comes out: the reply's text with each generated image where it was drawn, as a markdown image whose
target is a ``data:`` URL (``![caption](data:image/png;base64,...)``), so a plain chat UI shows it; the same
images, in order, as ``image_url`` parts in the message's extra field ``images``. An assistant message sent
back in a later request may keep those markdown images: they go back into the conversation as images, as
in a ``mim chat`` session, so the model sees what it drew.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from mim.serving.requests import RequestError, data_url_bytes, png_data_url
from synth.data.schema import IMAGE_PLACEHOLDER, escape_placeholders

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

#: A markdown image whose target is an image data URL: how this server writes the images it draws.
MARKDOWN_IMAGE = re.compile(r"!\[([^\]\n]*)\]\((data:image/[A-Za-z0-9.+-]+;base64,[A-Za-z0-9+/=]*)\)")

#: Options of OpenAI's API that MIM cannot honour: refused with a message, never silently ignored.
UNSUPPORTED = {"tools": "tool calls", "functions": "function calls", "tool_choice": "tool calls",
               "audio": "audio output", "prediction": "predicted outputs"}


@dataclass
class ImageSource:
    """An image a message holds: its bytes (a data URL) or the URL to fetch; ``where`` names it in errors."""

    where: str
    data: bytes | None = None
    url: str | None = None


@dataclass
class Message:
    role: str  # system, user or assistant
    content: str  # one <image> placeholder per image
    images: list[ImageSource] = field(default_factory=list)


@dataclass
class APILimits:
    """What one ``/v1/chat/completions`` request may ask for."""

    max_text_chars: int = 4000  # per message, images' data URLs not counted
    max_messages: int = 41  # 20 exchanges and a system message, as the demo's max_turns
    max_images: int = 8  # in the whole conversation (each is a run of query tokens)
    max_tokens: int = 256  # the server's max_new_tokens: a request may ask for fewer
    max_n: int = 4
    allow_remote_images: bool = False


@dataclass
class CompletionRequest:
    model: str
    messages: list[Message]
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


def _error(message: str, param: str, status: int = 400, code: str | None = None) -> RequestError:
    return RequestError(status, message, param=param, code=code or "invalid_value")


def _number(payload: dict, name: str, low: float, high: float, integer: bool = False) -> Any:
    value = payload.get(name)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise _error(f"{name} must be {kind} from {low:g} to {high:g}, got {value!r:.40}", name)
    return value


def _image_source(url: Any, where: str, param: str, limits: APILimits) -> ImageSource:
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str):
        raise _error(f"{where}: image_url needs a url string", param)
    if url.startswith("data:"):
        try:
            return ImageSource(where, data=data_url_bytes(url, where))
        except RequestError as error:
            raise _error(str(error), param) from None
    if url.startswith(("http://", "https://")):
        if not limits.allow_remote_images:
            raise _error(f"{where} is an http(s) URL; this server takes images as data: URLs only (start it with "
                         "--allow_remote_images true to let it fetch public URLs)", param, code="remote_image_refused")
        return ImageSource(where, url=url)
    raise _error(f"{where}: an image URL must be a data: URL{' or http(s)' if limits.allow_remote_images else ''}, "
                 f"got {url[:40]!r}", param)


def _assistant_text(text: str, where: str) -> tuple[str, list[ImageSource]]:
    """Assistant text with this server's markdown images put back as images (placeholders)."""
    pieces, images, last = [], [], 0
    for match in MARKDOWN_IMAGE.finditer(text):
        pieces.append(escape_placeholders(text[last:match.start()]))
        pieces.append(IMAGE_PLACEHOLDER)
        images.append(ImageSource(f"{where} image {len(images) + 1}",
                                  data=data_url_bytes(match.group(2), f"{where} image {len(images) + 1}")))
        last = match.end()
    pieces.append(escape_placeholders(text[last:]))
    return "".join(pieces), images


def _content(message: dict, index: int, role: str, limits: APILimits) -> tuple[str, list[ImageSource], int]:
    """(text with placeholders, images, characters of text) of one message's ``content``."""
    where, param = f"message {index + 1}", f"messages[{index}].content"
    content = message.get("content")
    if isinstance(content, str):
        if role == "assistant":
            text, images = _assistant_text(content, where)
            return text, images, len(MARKDOWN_IMAGE.sub("", content))
        return escape_placeholders(content), [], len(content)
    if not isinstance(content, list) or not content:
        raise _error(f"{where}: content must be a string or a non-empty list of parts", param)
    pieces, images, chars = [], [], 0
    for number, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            text, found, _ = _content({"content": part["text"]}, index, role, limits)
            images += [ImageSource(f"{where} image {len(images) + k + 1}", data=s.data) for k, s in enumerate(found)]
            pieces.append(("text", text))
            chars += len(MARKDOWN_IMAGE.sub("", part["text"]))
        elif kind == "image_url":
            if role == "system":
                raise _error(f"{where}: a system message cannot hold images", f"{param}[{number}]")
            images.append(_image_source(part.get("image_url"), f"{where} image {len(images) + 1}",
                                        f"{param}[{number}].image_url", limits))
            pieces.append(("image", IMAGE_PLACEHOLDER))
        else:
            raise _error(f"{where} part {number + 1}: type {kind!r} is not supported (text and image_url are)",
                         f"{param}[{number}].type")
    text = ""
    for position, (kind, piece) in enumerate(pieces):
        if position:
            text += "\n" if kind == "text" and pieces[position - 1][0] == "text" else " "
        text += piece
    return text, images, chars


def parse_completion_request(payload: dict, limits: APILimits) -> CompletionRequest:
    """The checked request, or a :class:`RequestError` naming the parameter (OpenAI's ``param``)."""
    for name, what in UNSUPPORTED.items():
        if payload.get(name):
            raise _error(f"{name} is not supported: MIM does not do {what}", name, code="unsupported_parameter")
    if payload.get("logprobs") or payload.get("top_logprobs"):
        raise _error("logprobs are not supported by this server", "logprobs", code="unsupported_parameter")
    response_format = payload.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise _error("only response_format {\"type\": \"text\"} is supported", "response_format",
                     code="unsupported_parameter")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise _error("model is required (GET /v1/models lists the served one)", "model", code="missing_required_parameter")
    raw = payload.get("messages")
    if not isinstance(raw, list) or not raw:
        raise _error("messages must be a non-empty list", "messages", code="missing_required_parameter")
    if len(raw) > limits.max_messages:
        raise _error(f"{len(raw)} messages; the limit is {limits.max_messages}", "messages")
    messages = []
    for index, message in enumerate(raw):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else message
            raise _error(f"message {index + 1}: role {role!r:.40} is not one of {', '.join(ROLES)}",
                         f"messages[{index}].role")
        if message.get("tool_calls"):
            raise _error(f"message {index + 1}: tool calls are not supported", f"messages[{index}].tool_calls",
                         code="unsupported_parameter")
        role = ROLES[message["role"]]
        text, images, chars = _content(message, index, role, limits)
        if chars > limits.max_text_chars:
            raise _error(f"message {index + 1} is {chars} characters; the limit is {limits.max_text_chars}",
                         f"messages[{index}].content")
        messages.append(Message(role, text, images))
    if messages[-1].role != "user":
        raise _error("the last message must be the user's: the server writes the assistant's reply to it",
                     f"messages[{len(messages) - 1}].role")
    total = sum(len(m.images) for m in messages)
    if total > limits.max_images:
        raise _error(f"the conversation holds {total} images; the limit is {limits.max_images}", "messages")
    stop = payload.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4
                             or not all(isinstance(s, str) and 0 < len(s) <= 64 for s in stop)):
        raise _error("stop must be a string or a list of at most 4 non-empty strings (64 characters each)", "stop")
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise _error("stream must be true or false", "stream")
    options = payload.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _error("stream_options must be an object", "stream_options")
    max_tokens = _number(payload, "max_completion_tokens", 1, limits.max_tokens, integer=True)
    if max_tokens is None:
        max_tokens = _number(payload, "max_tokens", 1, limits.max_tokens, integer=True)
    return CompletionRequest(
        model=model, messages=messages, n=_number(payload, "n", 1, limits.max_n, integer=True) or 1,
        stream=stream, include_usage=bool(options.get("include_usage")), max_tokens=max_tokens,
        temperature=_number(payload, "temperature", 0, 2), top_p=_number(payload, "top_p", 0, 1),
        seed=_number(payload, "seed", -(2**63), 2**63 - 1, integer=True), stop=tuple(stop or ()))


# --- what goes back ---------------------------------------------------------------------------------

def image_markdown(caption: str | None, url: str) -> str:
    alt = re.sub(r"[\[\]\n\r]", " ", caption or "generated image").strip() or "generated image"
    return f"![{alt}]({url})"


def image_part(part) -> dict:
    """A drawn image (an ImagePart) as an ``image_url`` part, with the head's caption when it wrote one."""
    return {"type": "image_url", "image_url": {"url": png_data_url(part.image)}, "caption": part.caption}


def reply_message(result) -> dict:
    """The assistant message of a completion: text with markdown images, and ``images`` beside it."""
    from mim.inference.interleaved import ImagePart

    content, images = "", []
    for part in result.parts:
        if isinstance(part, ImagePart):
            images.append(image_part(part))
            content += image_markdown(part.caption, images[-1]["image_url"]["url"])
        else:
            content += part.text
    return {"role": "assistant", "content": content, "images": images}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(completion_id: str, created: int, model: str, results: list, prompt_tokens: int) -> dict:
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": index, "message": reply_message(result), "finish_reason": result.finish_reason,
                         "logprobs": None} for index, result in enumerate(results)],
            "usage": usage(prompt_tokens, sum(result.completion_tokens for result in results))}


def chunk_body(completion_id: str, created: int, model: str, index: int | None, delta: dict | None = None,
               finish_reason: str | None = None, usage_counts: dict | None = None) -> dict:
    """One ``chat.completion.chunk``: a choice's delta, or (``index`` None) the closing usage chunk."""
    choices = [] if index is None else [{"index": index, "delta": delta or {}, "finish_reason": finish_reason,
                                         "logprobs": None}]
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choices}
    if usage_counts is not None:
        body["usage"] = usage_counts
    return body


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               408: "timeout_error", 411: "invalid_request_error", 413: "invalid_request_error",
               503: "server_error", 500: "server_error"}


def error_body(error: RequestError) -> dict:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": str(error), "type": ERROR_TYPES.get(error.status, "invalid_request_error"),
                      "param": error.param, "code": error.code}}
