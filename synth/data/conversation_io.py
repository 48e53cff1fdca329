"""Read and write conversation files: JSON arrays and JSONL, TextBind and LLaVA records.

Every rejected record is reported with its file, line and id. The caller
chooses what a bad record does: ``on_error="raise"`` stops at the first one
(for data you expect to be clean), ``on_error="skip"`` keeps going and
collects every rejection in a :class:`ReadReport` (for data you are cleaning).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from synth.atomic import atomic_path
from synth.data.chat_formats import from_openai, from_sharegpt, to_openai, to_sharegpt
from synth.data.schema import PARSERS, Conversation, Location, SchemaError, detect_format, to_textbind
from synth.data.sources import SOURCE_ID_FIELDS, SOURCE_PARSERS, container_records

OnError = Literal["raise", "skip"]
#: auto (TextBind or LLaVA, by the record's fields), or a source format of synth.data.sources.
Format = Literal["auto", "textbind", "llava", "platypus", "minigpt4", "shikra", "multiinstruct"]
#: every record format the readers take: the schema's, the chat formats', and the sources'.
RECORD_PARSERS = {**PARSERS, "openai": from_openai, "sharegpt": from_sharegpt}
FORMATS = ("auto", *RECORD_PARSERS, *SOURCE_PARSERS)
#: the formats ``synth convert-dataset --to`` writes
WRITERS = {"textbind": to_textbind, "openai": to_openai, "sharegpt": to_sharegpt}


@dataclass
class ReadReport:
    """What a read kept and what it rejected, and why; and which files held no record at all."""

    read: int = 0
    rejected: list[SchemaError] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)  # files with no record in them

    def reasons(self) -> Counter[str]:
        return Counter(error.rule for error in self.rejected)

    def summary(self) -> str:
        text = f"{self.read} conversation(s) read, {len(self.rejected)} rejected"
        if self.rejected:
            text += " (" + ", ".join(f"{rule}: {count}" for rule, count in sorted(self.reasons().items())) + ")"
        if self.empty:
            text += "; held no record: " + ", ".join(self.empty)
        return text


_NESTING = "nested deeper than Python's recursion limit allows; a conversation record is never that deep"


def _raw_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line, parsed JSON or the SchemaError that stopped it) for each record of a file.

    JSONL lines fail one at a time and the rest still read; a JSON array is
    decoded element by element so that every record still knows its line, and a
    bad element (invalid UTF-8, absurd nesting) is reported while the rest read on.
    """
    container = container_records(path)  # parquet tables, MiniGPT-4's {"annotations": [...]}
    if container is not None:
        yield from container
        return
    data = path.read_bytes()
    start = len(data) - len(data.lstrip())
    if data[start:start + 1] == b"[":
        yield from _array_records(data)
        return
    for number, raw_line in enumerate(data.splitlines(), start=1):
        if not raw_line.strip():
            continue
        try:
            yield number, json.loads(raw_line.decode("utf-8"))
        except UnicodeDecodeError as error:
            yield number, SchemaError("unreadable", f"line is not valid UTF-8 ({error.reason} at byte {error.start})")
        except json.JSONDecodeError as error:
            yield number, SchemaError("unreadable", f"line is not valid JSON: {error.msg} at column {error.colno}")
        except RecursionError:
            yield number, SchemaError("unreadable", f"line is {_NESTING}")


def _value_end(text: str, position: int) -> int | None:
    """Where the JSON value starting at ``position`` ends, found without recursion (for values too
    deep to parse); None when the text ends first. Strings and their escapes are respected."""
    depth, in_string, escaped = 0, False, False
    for index in range(position, len(text)):
        char = text[index]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
            if depth == 0:
                return index + 1
    return None


def _array_records(data: bytes) -> Iterator[tuple[int, Any]]:
    # Invalid UTF-8 bytes become lone surrogates (U+DC80..U+DCFF), so one bad byte costs only the
    # record that holds it; such a record is found by re-checking its span strictly.
    text = data.decode("utf-8", errors="surrogateescape")
    decoder = json.JSONDecoder()

    def skip_space(position: int) -> int:
        while position < len(text) and text[position].isspace():
            position += 1
        return position

    def line_of(position: int) -> int:
        return text.count("\n", 0, position) + 1

    position = skip_space(text.index("[") + 1)
    if text[position:position + 1] == "]":
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            # An array cannot be resynchronised after a syntax error: the rest is unread.
            yield error.lineno, SchemaError(
                "unreadable", f"not valid JSON: {error.msg} at column {error.colno}; the rest of the array is unread"
            )
            return
        except RecursionError:
            end = _value_end(text, position)
            if end is None:
                yield line_of(position), SchemaError("unreadable", f"record is {_NESTING}; the rest of the array "
                                                                   "is unread (the file ends inside it)")
                return
            value = SchemaError("unreadable", f"record is {_NESTING}")
        span = text[position:end]
        try:
            span.encode("utf-8")
        except UnicodeEncodeError as error:
            byte = len(text[:position + error.start].encode("utf-8", errors="surrogateescape"))
            value = SchemaError("unreadable", f"record holds bytes that are not valid UTF-8 (at byte {byte} of the "
                                              "file); fix the encoding of this record")
        yield line_of(position), value
        position = skip_space(end)
        separator = text[position:position + 1]
        if separator == "]":
            return
        if separator != ",":
            found = repr(separator) if separator else "the end of the file (truncated?)"
            yield line_of(position), SchemaError("unreadable", f"expected ',' or ']' in the JSON array, found {found}")
            return
        position = skip_space(position + 1)


def iter_conversations(
    path: str | os.PathLike[str],
    *,
    on_error: OnError = "raise",
    report: ReadReport | None = None,
    format: Format = "auto",
    inline_images: bool = False,
) -> Iterator[Conversation]:
    """Yield the valid conversations of one file, in order. ``inline_images``: keep OpenAI ``data:`` URL
    images for :func:`synth.data.chat_formats.materialize_inline_images` (``synth convert-dataset``); without
    it such a record is rejected (training reads image files).

    Records without an ``id`` get ``<file stem>-<index>`` so every record can
    be named in messages and kept apart when files are mixed. A second record
    with an id already used in the file is rejected (``duplicate_id``). A file
    with no record at all is listed in ``report.empty``.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    path = Path(path)
    report = report if report is not None else ReadReport()
    parsers = {**RECORD_PARSERS, **SOURCE_PARSERS}
    if inline_images:  # OpenAI records keep their data: URL images for convert-dataset to write out
        parsers["openai"] = partial(from_openai, inline_images=True)
    seen: dict[str, int] = {}  # record id -> line, within this file
    records = 0
    for index, (line, raw) in enumerate(_raw_records(path)):
        records += 1
        default_id = f"{path.stem}-{index:06d}"
        record_id = None
        try:
            if isinstance(raw, SchemaError):
                raise raw
            id_field = SOURCE_ID_FIELDS.get(format, "id")
            if isinstance(raw, dict) and isinstance(raw.get(id_field), (str, int)):
                record_id = str(raw[id_field])
            parse = parsers[detect_format(raw)] if format == "auto" else parsers[format]
            conversation = parse(raw, default_id)
            if conversation.id in seen:
                raise SchemaError("duplicate_id", f"id {conversation.id!r} was already used by the record at line "
                                                  f"{seen[conversation.id]}; ids must be unique within a file")
        except SchemaError as error:  # a record with no line (a container's entry) is named by its index id
            located = error.at(Location(str(path), line, record_id if record_id or line else default_id))
            if on_error == "raise":
                raise located from None
            report.rejected.append(located)
            continue
        seen[conversation.id] = line
        report.read += 1
        yield conversation
    if not records:
        report.empty.append(str(path))


def read_conversations(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    on_error: OnError = "raise",
    format: Format = "auto",
    inline_images: bool = False,
) -> tuple[list[Conversation], ReadReport]:
    """All valid conversations of one or more files, and the report of what was rejected."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    report = ReadReport()
    conversations = [c for path in paths for c in iter_conversations(path, on_error=on_error, report=report,
                                                                         format=format, inline_images=inline_images)]
    return conversations, report


def dumps_jsonl(conversation: Conversation, format: str = "textbind") -> str:
    return json.dumps(WRITERS[format](conversation), ensure_ascii=False) + "\n"


def write_conversations(path: str | os.PathLike[str], conversations: Iterable[Conversation],
                        format: str = "textbind") -> int:
    """Write JSONL atomically (a crash never leaves half a file) in ``format`` (TextBind by default, or one of
    :data:`WRITERS`); return the count."""
    if format not in WRITERS:
        raise ValueError(f"format must be one of {', '.join(WRITERS)}, got {format!r}")
    count = 0
    with atomic_path(path) as temporary, temporary.open("w", encoding="utf-8") as handle:
        for conversation in conversations:
            handle.write(dumps_jsonl(conversation, format))
            count += 1
    return count
