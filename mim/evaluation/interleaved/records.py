"""Reading a benchmark's published JSONL: one record a line, an id that names files, image paths that stay in
the benchmark's folder. A downloaded file is hostile until checked: a line that breaks a rule is rejected with
its line number and why, and the rest load."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class BenchmarkFormatError(ValueError):
    """A benchmark record that does not have the published layout (or points outside its folder)."""


def inside(root: Path, relative: Any, where: str) -> Path | None:
    """A path the file names, which must stay inside ``root`` (a downloaded file may not point elsewhere)."""
    if relative in (None, ""):
        return None
    if not isinstance(relative, str):
        raise BenchmarkFormatError(f"{where}: an image path must be a string")
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise BenchmarkFormatError(f"{where}: image path {relative!r} leaves the benchmark folder {root}")
    return path


def read_benchmark(path: str | Path, id_field: str, id_pattern: str, id_rule: str,
                   build: Callable[[str, dict, str], T]) -> tuple[list[T], list[str]]:
    """(what ``build(id, record, where)`` makes of each line, rejections). Ids must match ``id_pattern`` (they
    name answer files; ``id_rule`` says so in words) and be unique."""
    path = Path(path)
    items, rejected, seen = [], [], set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise BenchmarkFormatError("a line is one JSON object")
            key = str(record[id_field])
            if not re.fullmatch(id_pattern, key):
                raise BenchmarkFormatError(f"{id_field} {key!r} must be {id_rule}")
            if key in seen:
                raise BenchmarkFormatError(f"{id_field} {key} appears twice")
            items.append(build(key, record, where))
            seen.add(key)
        except (json.JSONDecodeError, KeyError, TypeError, BenchmarkFormatError) as error:
            rejected.append(f"{where}: {type(error).__name__}: {error}")
    return items, rejected
