"""The chat formats everyone now writes, read and written losslessly next to TextBind and LLaVA.

- **OpenAI** ``messages``: ``{"messages": [{"role", "content"}]}`` where ``content`` is a string or a list of
  parts, ``{"type": "text", "text"}`` and ``{"type": "image_url", "image_url": {"url"}}``. An image part
  stands where TextBind's ``<image>`` stands; its ``url`` is the image's path (relative to the record's
  ``image_dir``) or, in files others wrote, a ``data:`` URL (``synth convert-dataset`` writes those out as
  files; training reads files).
- **ShareGPT** (LLaMA-Factory's multimodal layout): ``{"conversations": [{"from", "value"}], "images": [...]}``
  with ``human``/``gpt``/``system`` roles and ``<image>`` placeholders filled in order. Without ``images`` it
  is LLaVA's layout, which :func:`synth.data.schema.from_llava` reads.

What neither format has a field for travels in fields of our own, which other readers ignore: the
captions of generated images (``caption_list`` on the message), ``meta``, ``image_dir``, and every other
field of a turn or a record as it was. So TextBind -> OpenAI -> TextBind and TextBind -> ShareGPT ->
TextBind give back the same record.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from pathlib import Path
from typing import Any

from synth.data.schema import (IMAGE_PLACEHOLDER, LLAVA_ROLES, Conversation, SchemaError, Turn, _image_dir, _meta,
                               _record_id, _string_list, validate, with_record_fields)

_SHAREGPT_FROM = {role: name for name, role in LLAVA_ROLES.items()}
_DATA_URL = re.compile(r"data:image/(png|jpeg|jpg|webp|gif);base64,(.*)", re.DOTALL)


def _split_placeholders(content: str) -> list[str]:
    """The text around each ``<image>``: n placeholders give n + 1 pieces."""
    return content.split(IMAGE_PLACEHOLDER)


# --- OpenAI messages -----------------------------------------------------------------------------------


def to_openai(conversation: Conversation) -> dict[str, Any]:
    """The conversation as an OpenAI chat record; text-only turns keep a plain string ``content``."""
    messages = []
    for turn in conversation.turns:
        if turn.image_list:
            pieces = _split_placeholders(turn.content)
            parts: list[dict[str, Any]] = []
            for index, piece in enumerate(pieces):
                if piece:
                    parts.append({"type": "text", "text": piece})
                if index < len(turn.image_list):
                    parts.append({"type": "image_url", "image_url": {"url": turn.image_list[index]}})
            content: Any = parts
        else:
            content = turn.content
        message: dict[str, Any] = {"role": turn.role, "content": content}
        if turn.caption_list:
            message["caption_list"] = list(turn.caption_list)
        message.update(turn.extra)
        messages.append(message)
    return with_record_fields({"id": conversation.id, "messages": messages}, conversation)


def _image_url(part: dict[str, Any], where: str) -> str:
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise SchemaError("bad_type", f"{where}: an image_url part needs a string url, got {value!r}")
    if url.startswith(("http://", "https://")):
        raise SchemaError("remote_image", f"{where}: image {url[:100]!r} is remote; download it first (training "
                                          "reads local files, and nothing is fetched while reading a dataset)")
    if url.startswith("file://"):
        url = url[len("file://"):]
    return url


def from_openai(record: object, default_id: str, inline_images: bool = False) -> Conversation:
    """An OpenAI chat record (``messages``) as a Conversation; image parts become ``<image>`` placeholders.
    A ``data:`` URL image is refused unless ``inline_images`` (then :func:`materialize_inline_images` must
    write it out before the record is used)."""
    if not isinstance(record, dict):
        raise SchemaError("bad_type", f"a record must be a JSON object, got {type(record).__name__}")
    raw_messages = record.get("messages")
    if not isinstance(raw_messages, list):
        raise SchemaError("missing_field", "an OpenAI chat record needs a 'messages' list")
    turns = []
    for index, raw in enumerate(raw_messages):
        where = f"message {index}"
        if not isinstance(raw, dict) or not isinstance(raw.get("role"), str) or "content" not in raw:
            raise SchemaError("missing_field", f"{where}: a message needs a string 'role' and a 'content'")
        content, images = raw["content"], []
        if content is None:
            content = ""
        if isinstance(content, list):
            text = []
            for number, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    text.append(part["text"])
                elif kind == "image_url":
                    images.append(_image_url(part, f"{where} part {number}"))
                    text.append(IMAGE_PLACEHOLDER)
                else:
                    raise SchemaError("bad_type", f"{where} part {number}: expected a text or image_url part, "
                                                  f"got {part!r}"[:300])
            content = "".join(text)
        elif not isinstance(content, str):
            raise SchemaError("bad_type", f"{where}: 'content' must be a string or a list of parts")
        elif IMAGE_PLACEHOLDER in content:
            raise SchemaError("placeholder_mismatch", f"{where}: a string content with {IMAGE_PLACEHOLDER} has no "
                                                      "image; give images as image_url parts")
        turns.append(Turn(role=raw["role"], content=content, image_list=images,
                          caption_list=_string_list(raw.get("caption_list"), "caption_list", where),
                          extra={k: v for k, v in raw.items() if k not in ("role", "content", "caption_list")}))
    conversation = Conversation(
        id=_record_id(record, default_id), turns=turns, image_dir=_image_dir(record),
        meta=_meta(record, "meta"),
        extra={k: v for k, v in record.items() if k not in ("id", "messages", "image_dir", "meta")})
    if any(url.startswith("data:") for turn in turns for url in turn.image_list):
        if not inline_images:
            raise SchemaError("inline_image", "the record holds data: URL images; write them out as files with "
                                              "`synth convert-dataset FILE --format openai --out OUT.jsonl` first")
        conversation.extra["_inline_images"] = True  # written out as files by materialize_inline_images
        return conversation
    validate(conversation)
    return conversation


def materialize_inline_images(conversation: Conversation, folder: str | os.PathLike[str],
                              image_dir: str) -> Conversation:
    """Write each ``data:`` URL image of ``conversation`` to ``folder`` (named by its content's SHA-256, so
    the same picture is one file and no existing file is ever replaced by another) and point the turn at
    it; ``image_dir`` is what the record then records."""
    from synth.data.images import decode_image

    folder = Path(folder)
    for turn in conversation.turns:
        names = []
        for url in turn.image_list:
            if not url.startswith("data:"):
                names.append(url)
                continue
            match = _DATA_URL.fullmatch(url)
            if match is None:
                raise SchemaError("bad_image", f"image {url[:60]!r}...: only base64 data:image/png|jpeg|webp|gif "
                                               "URLs are read")
            try:
                data = base64.b64decode(match.group(2), validate=True)
            except (binascii.Error, ValueError) as error:
                raise SchemaError("bad_image", f"image data URL is not valid base64: {error}") from None
            try:  # a picture that does not decode costs its record, not the run
                decode_image(data)
            except (OSError, ValueError) as error:  # ImageDecodeError is an OSError
                raise SchemaError("bad_image", f"image data URL does not decode: {error}") from None
            name = f"{hashlib.sha256(data).hexdigest()}.{'jpg' if match.group(1) == 'jpeg' else match.group(1)}"
            path = folder / name
            if not path.exists():
                folder.mkdir(parents=True, exist_ok=True)
                temporary = path.with_suffix(path.suffix + ".part")
                temporary.write_bytes(data)
                os.replace(temporary, path)
            names.append(name)
        turn.image_list = names
    conversation.extra.pop("_inline_images", None)
    conversation.image_dir = image_dir
    validate(conversation)
    return conversation


# --- ShareGPT ------------------------------------------------------------------------------------------


def to_sharegpt(conversation: Conversation) -> dict[str, Any]:
    """The conversation as a ShareGPT record (``conversations`` of from/value, ``images`` in order)."""
    turns = []
    for turn in conversation.turns:
        if turn.role not in _SHAREGPT_FROM:
            raise SchemaError("bad_role", f"ShareGPT has no role for {turn.role!r}")
        entry: dict[str, Any] = {"from": _SHAREGPT_FROM[turn.role], "value": turn.content}
        if turn.caption_list:
            entry["caption_list"] = list(turn.caption_list)
        entry.update(turn.extra)
        turns.append(entry)
    return with_record_fields({"id": conversation.id, "conversations": turns, "images": list(conversation.images)},
                              conversation)


def from_sharegpt(record: object, default_id: str) -> Conversation:
    """A ShareGPT record as a Conversation: its ``images`` fill the ``<image>`` placeholders in order."""
    if not isinstance(record, dict):
        raise SchemaError("bad_type", f"a record must be a JSON object, got {type(record).__name__}")
    raw_turns = record.get("conversations")
    if not isinstance(raw_turns, list):
        raise SchemaError("missing_field", "a ShareGPT record needs a 'conversations' list")
    images = _string_list(record.get("images"), "images", "record")
    turns = []
    for index, raw in enumerate(raw_turns):
        where = f"turn {index}"
        if not isinstance(raw, dict) or not isinstance(raw.get("value"), str) or raw.get("from") not in LLAVA_ROLES:
            raise SchemaError("missing_field", f"{where}: a ShareGPT turn needs 'from' (one of "
                                               f"{sorted(LLAVA_ROLES)}) and a string 'value', got {raw!r}"[:300])
        turns.append(Turn(role=LLAVA_ROLES[raw["from"]], content=raw["value"],
                          caption_list=_string_list(raw.get("caption_list"), "caption_list", where),
                          extra={k: v for k, v in raw.items() if k not in ("from", "value", "caption_list")}))
    remaining = list(images)
    for turn in turns:
        turn.image_list, remaining = remaining[:turn.num_placeholders], remaining[turn.num_placeholders:]
    placeholders = sum(turn.num_placeholders for turn in turns)
    if placeholders != len(images):
        raise SchemaError("placeholder_mismatch", f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) across turns "
                                                  f"but {len(images)} image(s) in 'images'")
    conversation = Conversation(
        id=_record_id(record, default_id), turns=turns, image_dir=_image_dir(record),
        meta=_meta(record, "meta"),
        extra={k: v for k, v in record.items() if k not in ("id", "conversations", "images", "image_dir", "meta")})
    validate(conversation)
    return conversation
