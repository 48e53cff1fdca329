"""Stage 6, filter: generations -> the conversation dataset, and the rejects with reasons (section 3.2).

Kept conversations are written in the schema (``conversations.jsonl``) with
their images copied next to them (``images/<pair id>.<ext>``), so the dataset
is self-contained whatever the images' origin (folders or tar shards).
Each rejected generation goes to ``rejected.jsonl`` with its reason, detail
and the raw output, so a person can check what the rules threw away.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from synth.atomic import atomic_path, atomic_write_text
from synth.conversation_io import write_conversations
from synth.dialogue_parser import ParseRejection, parse_dialogue
from synth.pairs import TAR_SEPARATOR, read_image_bytes
from synth.schema import Conversation, SchemaError, Turn, validate

IMAGE_DIR = "images"


def _image_name(pair: dict[str, Any]) -> str:
    reference = pair["image"]
    member = reference.split("#", 1)[1] if TAR_SEPARATOR in reference else reference
    suffix = Path(member).suffix.lower() or ".jpg"
    return f"{pair['id']}{suffix}"


def to_conversation(generation: dict[str, Any], max_distance: float) -> Conversation | ParseRejection:
    pairs = generation["pairs"]
    captions = [pair["caption"] for pair in pairs]
    parsed = parse_dialogue(generation.get("output"), captions, max_distance)
    if isinstance(parsed, ParseRejection):
        return parsed
    turns = [Turn(turn.role, turn.content, [_image_name(pairs[i]) for i in turn.images],
                  [captions[i] for i in turn.images]) for turn in parsed]
    conversation = Conversation(
        id=f"tb-{generation['group_id']}", turns=turns, image_dir=IMAGE_DIR,
        meta={"group_id": generation["group_id"], "cluster": generation.get("cluster"),
              "generator": generation.get("model"), "examples": generation.get("examples", [])})
    try:
        validate(conversation)
    except SchemaError as error:  # e.g. a dialogue that ends before any Assistant turn
        return ParseRejection("schema", error.detail)
    return conversation


def _generation(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("pairs"), list) or "group_id" not in record:
        return None
    if not all(isinstance(p, dict) and isinstance(p.get("caption"), str) and "image" in p and "id" in p
               for p in record["pairs"]):
        return None
    return record


def filter_generations(generations_path: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                       max_distance: float = 0.1) -> dict[str, Any]:
    out_dir = Path(out_dir)
    kept: list[Conversation] = []
    rejected: list[str] = []
    reasons: Counter[str] = Counter()
    images: dict[str, str] = {}
    with open(generations_path, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            generation = _generation(line)
            if generation is None:  # a line damaged on disk: reported, never fatal
                reasons["unreadable_line"] += 1
                rejected.append(json.dumps({"group_id": None, "reason": "unreadable_line",
                                            "detail": f"{generations_path}:{number} is not a generation record",
                                            "output": line[:1000]}, ensure_ascii=False) + "\n")
                continue
            result = to_conversation(generation, max_distance)
            if isinstance(result, ParseRejection):
                reasons[result.reason] += 1
                rejected.append(json.dumps({"group_id": generation["group_id"], "reason": result.reason,
                                            "detail": result.detail, "output": generation.get("output")},
                                           ensure_ascii=False) + "\n")
                continue
            kept.append(result)
            for pair in generation["pairs"]:
                images[_image_name(pair)] = pair["image"]
    used = {name for conversation in kept for name in conversation.images}
    for name in sorted(used):
        target = out_dir / IMAGE_DIR / name
        if not target.exists():
            with atomic_path(target) as temporary:
                temporary.write_bytes(read_image_bytes(images[name]))
    write_conversations(out_dir / "conversations.jsonl", kept)
    atomic_write_text(out_dir / "rejected.jsonl", "".join(rejected))
    total = len(kept) + len(rejected)
    summary = {"generations": total, "kept": len(kept), "rejected": len(rejected),
               "kept_share": round(len(kept) / total, 4) if total else 0.0,
               "reasons": dict(sorted(reasons.items())), "images": len(used), "max_edit_distance": max_distance}
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    return summary
