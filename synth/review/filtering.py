"""Stage 6, filter: generations -> the conversation dataset, and the rejects with reasons (section 3.2).

The rules are section 3.2's (format, image tags, descriptions edited beyond
0.1) and, as named options defaulting to what the released data went through
(``process_mim.py``), a minimum number of messages, at least one image, no
response seen before, and no trailing user turn.

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from synth.atomic import atomic_path, atomic_write_text
from synth.data.conversation_io import write_conversations
from synth.review.dialogue_parser import ParseRejection, parse_dialogue
from synth.data.pairs import TAR_SEPARATOR, read_image_bytes
from synth.data.schema import Conversation, SchemaError, Turn, validate

IMAGE_DIR = "images"


def _image_name(pair: dict[str, Any]) -> str:
    reference = pair["image"]
    member = reference.split("#", 1)[1] if TAR_SEPARATOR in reference else reference
    suffix = Path(member).suffix.lower() or ".jpg"
    return f"{pair['id']}{suffix}"


@dataclass
class FilterRules:
    """What the filter stage keeps. Defaults: the paper's threshold and the released data's rules."""

    max_edit_distance: float = 0.1  # section 3.2 (process_mim.py: mim_edit_dist=0.1)
    edit_distance_norm: str = "caption"  # process_mim.py: edits / len(caption); "longer": ours, always in [0, 1]
    min_messages: int = 3  # process_mim.py: min_turn_num=3, counting Human and Assistant messages
    require_image: bool = True  # process_mim.py: has_image
    drop_duplicate_responses: bool = True  # process_mim.py: a generation seen before is dropped
    drop_trailing_user_turn: bool = True  # a dialogue may stop after Human (Appendix A): nothing to learn there
    user_names: tuple[str, ...] = ("Human",)  # Appendix A's; add "User" for models that write User:/USER:
    assistant_names: tuple[str, ...] = ("Assistant",)


def to_conversation(generation: dict[str, Any], rules: FilterRules | float = FilterRules()
                    ) -> Conversation | ParseRejection:
    if not isinstance(rules, FilterRules):  # a bare threshold, as earlier versions took
        rules = FilterRules(max_edit_distance=float(rules))
    pairs = generation["pairs"]
    captions = [pair["caption"] for pair in pairs]
    if generation.get("structured") and generation.get("finish_reason") == "length":
        # a constraint's guarantees (every image once, the turns) hold for a finished dialogue only
        return ParseRejection("truncated", f"the {generation['structured']}-constrained reply ran out of "
                                           "max_tokens before the dialogue ended; raise generate.max_tokens")
    parsed = parse_dialogue(generation.get("output"), captions, rules.max_edit_distance, rules.edit_distance_norm,
                            tuple(rules.user_names), tuple(rules.assistant_names))
    if isinstance(parsed, ParseRejection):
        return parsed
    if len(parsed) < rules.min_messages:
        return ParseRejection("too_short", f"{len(parsed)} message(s); at least {rules.min_messages} are required")
    if rules.require_image and not any(turn.images for turn in parsed):
        return ParseRejection("no_image", "the dialogue shows no image")
    if rules.drop_trailing_user_turn and len(parsed) > 1 and parsed[-1].role == "user":
        parsed = parsed[:-1]
    turns = [Turn(turn.role, turn.content, [_image_name(pairs[i]) for i in turn.images],
                  [captions[i] for i in turn.images]) for turn in parsed]
    conversation = Conversation(
        id=f"tb-{generation['group_id']}", turns=turns, image_dir=IMAGE_DIR,
        meta={"group_id": generation["group_id"], "cluster": generation.get("cluster"),
              "generator": generation.get("model"), "examples": generation.get("examples", []),
              **({"structured": generation["structured"]} if generation.get("structured") else {}),
              # answer keys a composer knew (the world's): by message index, which parsing keeps
              **({"answers": generation["answers"]} if isinstance(generation.get("answers"), list) else {})})
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


def format_adherence(generations_path: str | os.PathLike[str], rules: FilterRules = FilterRules()
                     ) -> dict[str, dict[str, Any]]:
    """Per model: how many outputs parse as a dialogue (format, image tags, descriptions), and why the rest do not."""
    counts: dict[str, dict[str, Any]] = {}
    with open(generations_path, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            generation = _generation(line) if line.strip() else None
            if generation is None:
                continue
            entry = counts.setdefault(str(generation.get("model") or "unknown"),
                                      {"outputs": 0, "parsed": 0, "reasons": Counter()})
            entry["outputs"] += 1
            parsed = parse_dialogue(generation.get("output"), [pair["caption"] for pair in generation["pairs"]],
                                    rules.max_edit_distance, rules.edit_distance_norm, tuple(rules.user_names),
                                    tuple(rules.assistant_names))
            if isinstance(parsed, ParseRejection):
                entry["reasons"][parsed.reason] += 1
            else:
                entry["parsed"] += 1
    return {model: {**entry, "parse_share": round(entry["parsed"] / entry["outputs"], 4),
                    "reasons": dict(sorted(entry["reasons"].items()))} for model, entry in sorted(counts.items())}


def filter_generations(generations_path: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                       rules: FilterRules | float = FilterRules()) -> dict[str, Any]:
    if not isinstance(rules, FilterRules):
        rules = FilterRules(max_edit_distance=float(rules))
    out_dir = Path(out_dir)
    kept: list[Conversation] = []
    rejected: list[str] = []
    reasons: Counter[str] = Counter()
    images: dict[str, str] = {}
    seen_outputs: dict[str, str] = {}  # output text -> first group that produced it
    by_model: dict[str, dict[str, Any]] = {}
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
            output = generation.get("output")
            model = str(generation.get("model") or "unknown")
            per_model = by_model.setdefault(model, {"generations": 0, "kept": 0, "reasons": Counter()})
            per_model["generations"] += 1
            if rules.drop_duplicate_responses and isinstance(output, str) and output in seen_outputs:
                result = ParseRejection("duplicate_response", f"the same output as group {seen_outputs[output]}")
            else:
                result = to_conversation(generation, rules)
                if isinstance(output, str):
                    seen_outputs.setdefault(output, generation["group_id"])
            if isinstance(result, ParseRejection):
                reasons[result.reason] += 1
                per_model["reasons"][result.reason] += 1
                rejected.append(json.dumps({"group_id": generation["group_id"], "reason": result.reason,
                                            "detail": result.detail, "output": generation.get("output")},
                                           ensure_ascii=False) + "\n")
                continue
            per_model["kept"] += 1
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
               "reasons": dict(sorted(reasons.items())), "images": len(used), "rules": asdict(rules),
               "by_model": {model: {**counts, "kept_share": round(counts["kept"] / counts["generations"], 4),
                                    "reasons": dict(sorted(counts["reasons"].items()))}
                            for model, counts in sorted(by_model.items())}}
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    return summary
