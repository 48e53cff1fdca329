"""The conversation schema: the contract between ``synth`` and training.

It is the format of the released TextBind data, so that data loads unchanged,
and ``synth`` writes the same format::

    {"id": "tb-000123",
     "conversation": [
       {"role": "user", "content": "Here they are: <image> and <image>",
        "image_list": ["490272.png", "862235.png"],
        "caption_list": ["museum - the 1st nuclear submarine", "..."]},
       {"role": "assistant", "content": "...", "image_list": [], "caption_list": []}],
     "image_dir": "images/",
     "meta": {"cluster": 17, "generator": "gpt-4", "seed": 3}}

The ``<image>`` placeholders of a turn map, in order, to its ``image_list``
and ``caption_list``. ``caption_list`` may be empty when captions are unknown
(the released data leaves it empty for LLaVA and other mixed-in sources);
otherwise it has one caption per image. Fields this module does not know are
kept in ``extra`` and written back, so reading and writing loses nothing.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

IMAGE_PLACEHOLDER = "<image>"
#: Inserted after "<" to disarm a control token spelled in text: it looks the same, tokenizes as plain text.
_DISARM = "\u200b"


def escape_placeholders(text: str) -> str:
    """Text in which a literal ``<image>`` no longer counts as an image placeholder.

    Model-written text can spell ``<image>`` from sub-word pieces; left alone it would
    be taken for an image in the next turn and break the conversation for good.
    """
    return text.replace(IMAGE_PLACEHOLDER, "<" + _DISARM + IMAGE_PLACEHOLDER[1:])


def escape_control_tokens(text: str, tokens) -> str:
    """Text in which none of ``tokens`` (a tokenizer's special tokens: ``</s>``, ``<start>``...) is
    spelled whole, so what a user types cannot act as a control token. ``<image>`` is left
    alone: it is how a user places an attached image."""
    for token in sorted(set(tokens) - {IMAGE_PLACEHOLDER}, key=len, reverse=True):
        if len(token) > 1 and token in text:
            text = text.replace(token, token[0] + _DISARM + token[1:])
    return text
ROLES = ("system", "user", "assistant")
LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


@dataclass(frozen=True)
class Location:
    """Where a record came from, for error messages a person can act on."""

    path: str | None = None
    line: int | None = None
    record_id: str | None = None

    def __str__(self) -> str:
        where = self.path or "<memory>"
        if self.line is not None:
            where += f":{self.line}"
        if self.record_id is not None:
            where += f" (record {self.record_id!r})"
        return where


class SchemaError(ValueError):
    """A record that breaks the conversation schema.

    ``rule`` names the broken rule (for counting rejections by reason),
    ``location`` says where the record is, and the message says what to do.
    """

    def __init__(self, rule: str, message: str, location: Location | None = None):
        self.rule = rule
        self.detail = message
        self.location = location or Location()
        super().__init__(f"{self.location}: {message}")

    def at(self, location: Location) -> "SchemaError":
        return SchemaError(self.rule, self.detail, location)


@dataclass
class Turn:
    role: str
    content: str
    image_list: list[str] = field(default_factory=list)
    caption_list: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_placeholders(self) -> int:
        return self.content.count(IMAGE_PLACEHOLDER)


@dataclass
class Conversation:
    id: str
    turns: list[Turn]
    image_dir: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def image_base(self, root: str | os.PathLike[str]) -> Path:
        """The folder this conversation's images live in: ``image_dir`` under ``root``.

        ``root`` is where a relative ``image_dir`` resolves (the data file's directory, or a
        dataset root the caller names); ``image_dir`` may not lead outside it, whether by
        ``..`` or by being absolute (an absolute ``image_dir`` inside ``root`` is fine).
        """
        root_abs = os.path.abspath(root)
        base = os.path.normpath(os.path.join(root_abs, self.image_dir or ""))
        if base != root_abs and not base.startswith(root_abs.rstrip(os.sep) + os.sep):
            raise SchemaError(
                "path_escape",
                f"image_dir {self.image_dir!r} leads outside the image root {root_abs} (to {base}); set the "
                "source's image_root to a folder that contains it, or fix image_dir")
        return Path(base)

    def image_path(self, name: str, root: str | os.PathLike[str]) -> Path:
        """Filesystem path of image ``name`` of this conversation, checked to stay inside its image folder.

        A symbolic link inside the folder that points outside it is refused; the folder
        itself may be a link (a dataset on another disk).
        """
        check_image_name(name)
        base = self.image_base(root)
        path = base / PurePosixPath(name)
        resolved, resolved_base = path.resolve(), base.resolve()
        if resolved != resolved_base and resolved_base not in resolved.parents:
            raise SchemaError("path_escape", f"image {name!r} is a symbolic link to {resolved}, outside the image "
                                             f"folder {resolved_base}")
        return path

    @property
    def images(self) -> list[str]:
        return [name for turn in self.turns for name in turn.image_list]


def check_image_name(name: object) -> None:
    """Reject image paths that could leave ``image_dir`` (absolute, ``..``, drives)."""
    if not isinstance(name, str) or not name.strip():
        raise SchemaError("bad_image_path", f"image path must be a non-empty string, got {name!r}")
    if "\x00" in name:
        raise SchemaError("bad_image_path", f"image path {name!r} contains a NUL byte")
    windows = PureWindowsPath(name)
    if PurePosixPath(name).is_absolute() or windows.drive or windows.root:
        raise SchemaError(
            "path_escape",
            f"image path {name!r} is absolute; image paths must be relative to the conversation's image_dir",
        )
    parts = name.replace("\\", "/").split("/")
    if ".." in parts or posixpath.normpath(name.replace("\\", "/")).startswith(".."):
        raise SchemaError(
            "path_escape",
            f"image path {name!r} climbs out of image_dir with '..'; move the image under image_dir",
        )


def validate(conversation: Conversation) -> None:
    """Raise :class:`SchemaError` for the first rule the conversation breaks.

    Rules: at least one turn; roles are ``system`` (first only), then ``user``
    and ``assistant`` alternating from ``user``, with at least one assistant
    turn (a trailing user turn is allowed: the released data has some, and it
    is simply not trained on); no empty turn; as many ``<image>`` placeholders
    as ``image_list`` entries; ``caption_list`` empty or one per image; image
    paths relative and inside ``image_dir``.
    """
    turns = conversation.turns
    if not turns:
        raise SchemaError("empty_conversation", "conversation has no turns")
    expected = "user"
    for index, turn in enumerate(turns):
        where = f"turn {index} ({turn.role})"
        if turn.role not in ROLES:
            raise SchemaError("bad_role", f"{where}: role must be one of {ROLES}, got {turn.role!r}")
        if turn.role == "system":
            if index != 0:
                raise SchemaError("role_order", f"{where}: a system turn may only come first")
        else:
            if turn.role != expected:
                raise SchemaError(
                    "role_order",
                    f"{where}: expected a {expected} turn here; roles must alternate user/assistant "
                    "starting with user (after an optional system turn)",
                )
            expected = "assistant" if expected == "user" else "user"
        if not turn.content.strip():
            raise SchemaError("empty_turn", f"{where}: content is empty")
        placeholders = turn.num_placeholders
        if placeholders != len(turn.image_list):
            raise SchemaError(
                "placeholder_mismatch",
                f"{where}: {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) in content but "
                f"{len(turn.image_list)} entries in image_list; they must match one to one, in order",
            )
        if turn.caption_list and len(turn.caption_list) != len(turn.image_list):
            raise SchemaError(
                "caption_mismatch",
                f"{where}: {len(turn.caption_list)} captions for {len(turn.image_list)} images; "
                "caption_list must be empty or hold one caption per image",
            )
        for name in turn.image_list:
            try:
                check_image_name(name)
            except SchemaError as error:
                raise SchemaError(error.rule, f"{where}: {error.detail}") from None
    if not any(turn.role == "assistant" for turn in turns):
        raise SchemaError("no_assistant_turn", "conversation has no assistant turn, so nothing to learn from")


# --- dictionaries <-> records ---------------------------------------------------

_TURN_FIELDS = ("role", "content", "image_list", "caption_list")
_RECORD_FIELDS = ("id", "conversation", "image_dir", "meta")


def _string_list(value: object, name: str, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise SchemaError("bad_type", f"{where}: {name} must be a list of strings, got {value!r}")
    return list(value)


def _record_id(record: dict[str, Any], default_id: str) -> str:
    value = record.get("id")
    if value is None:
        return default_id
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)
    raise SchemaError("bad_type", f"id must be a string or integer, got {value!r}")


def _image_dir(record: dict[str, Any]) -> str | None:
    value = record.get("image_dir")
    if value is not None and not isinstance(value, str):
        raise SchemaError("bad_type", f"image_dir must be a string, got {value!r}")
    return value


def _meta(record: dict[str, Any], key: str) -> dict[str, Any]:
    value = record.get(key) or {}
    if not isinstance(value, dict):
        raise SchemaError("bad_type", f"{key} must be an object, got {value!r}")
    return dict(value)


def from_textbind(record: object, default_id: str) -> Conversation:
    """A TextBind-format record (``conversation`` of role/content turns) as a Conversation."""
    if not isinstance(record, dict):
        raise SchemaError("bad_type", f"a record must be a JSON object, got {type(record).__name__}")
    if "conversation" not in record:
        raise SchemaError("missing_field", "record has no 'conversation' field")
    raw_turns = record["conversation"]
    if not isinstance(raw_turns, list):
        raise SchemaError("bad_type", f"'conversation' must be a list of turns, got {type(raw_turns).__name__}")
    turns = []
    for index, raw in enumerate(raw_turns):
        where = f"turn {index}"
        if not isinstance(raw, dict):
            raise SchemaError("bad_type", f"{where}: a turn must be an object, got {raw!r}")
        for required in ("role", "content"):
            if required not in raw:
                raise SchemaError("missing_field", f"{where}: missing field {required!r}")
        if not isinstance(raw["role"], str) or not isinstance(raw["content"], str):
            raise SchemaError("bad_type", f"{where}: 'role' and 'content' must be strings")
        turns.append(Turn(
            role=raw["role"],
            content=raw["content"],
            image_list=_string_list(raw.get("image_list"), "image_list", where),
            caption_list=_string_list(raw.get("caption_list"), "caption_list", where),
            extra={key: value for key, value in raw.items() if key not in _TURN_FIELDS},
        ))
    conversation = Conversation(
        id=_record_id(record, default_id),
        turns=turns,
        image_dir=_image_dir(record),
        meta=_meta(record, "meta"),
        extra={key: value for key, value in record.items() if key not in _RECORD_FIELDS},
    )
    validate(conversation)
    return conversation


def from_llava(record: object, default_id: str) -> Conversation:
    """A LLaVA-format record (``conversations`` of from/value, ``image``) as a Conversation.

    LLaVA's ``image`` is one path (or a list); its images fill the ``<image>``
    placeholders in order. A record with an image but no placeholder gets one
    in front of its first human turn, as LLaVA's own preprocessing does.
    """
    if not isinstance(record, dict):
        raise SchemaError("bad_type", f"a record must be a JSON object, got {type(record).__name__}")
    raw_turns = record.get("conversations")
    if not isinstance(raw_turns, list):
        raise SchemaError("missing_field", "LLaVA record needs a 'conversations' list")
    images = record.get("image")
    images = [] if images is None else [images] if isinstance(images, str) else images
    images = _string_list(images, "image", "record")
    turns = []
    for index, raw in enumerate(raw_turns):
        where = f"turn {index}"
        if not isinstance(raw, dict) or "from" not in raw or "value" not in raw:
            raise SchemaError("missing_field", f"{where}: a LLaVA turn needs 'from' and 'value', got {raw!r}")
        if raw["from"] not in LLAVA_ROLES:
            raise SchemaError("bad_role", f"{where}: 'from' must be one of {sorted(LLAVA_ROLES)}, got {raw['from']!r}")
        if not isinstance(raw["value"], str):
            raise SchemaError("bad_type", f"{where}: 'value' must be a string")
        turns.append(Turn(role=LLAVA_ROLES[raw["from"]], content=raw["value"],
                          extra={key: value for key, value in raw.items() if key not in ("from", "value")}))
    if images and not any(turn.num_placeholders for turn in turns):
        first_user = next((turn for turn in turns if turn.role == "user"), None)
        if first_user is not None:
            first_user.content = f"{IMAGE_PLACEHOLDER}\n{first_user.content}"
    remaining = list(images)
    for turn in turns:
        take = turn.num_placeholders
        turn.image_list, remaining = remaining[:take], remaining[take:]
    total = sum(turn.num_placeholders for turn in turns)
    if total != len(images):
        raise SchemaError(
            "placeholder_mismatch",
            f"{total} {IMAGE_PLACEHOLDER} placeholder(s) across turns but {len(images)} image(s) in 'image'",
        )
    conversation = Conversation(
        id=_record_id(record, default_id),
        turns=turns,
        image_dir=_image_dir(record),
        meta={},
        extra={key: value for key, value in record.items() if key not in ("id", "image", "conversations", "image_dir")},
    )
    validate(conversation)
    return conversation


def to_textbind(conversation: Conversation) -> dict[str, Any]:
    """The record as a TextBind-format dictionary (what ``synth`` writes)."""
    record: dict[str, Any] = {"id": conversation.id, "conversation": [
        {"role": turn.role, "content": turn.content, "image_list": list(turn.image_list),
         "caption_list": list(turn.caption_list), **turn.extra}
        for turn in conversation.turns
    ]}
    return with_record_fields(record, conversation)


def with_record_fields(record: dict[str, Any], conversation: Conversation) -> dict[str, Any]:
    """``record`` (id and turns in some format) completed with the conversation's ``image_dir``, ``meta`` and
    other fields: what every writer adds the same way, so each format round-trips them."""
    if conversation.image_dir is not None:
        record["image_dir"] = conversation.image_dir
    if conversation.meta:
        record["meta"] = dict(conversation.meta)
    record.update(conversation.extra)
    return record


def detect_format(record: object) -> str:
    """``textbind``, ``llava``, ``sharegpt`` (LLaVA's turns with an ``images`` list) or ``openai``
    (``messages``), from the record's fields."""
    if isinstance(record, dict):
        if "conversation" in record:
            return "textbind"
        if "conversations" in record:
            return "sharegpt" if "images" in record else "llava"
        if "messages" in record:
            return "openai"
    raise SchemaError(
        "unknown_format",
        "record has none of 'conversation' (TextBind format), 'conversations' (LLaVA or ShareGPT) and "
        "'messages' (OpenAI chat)",
    )


PARSERS = {"textbind": from_textbind, "llava": from_llava}
