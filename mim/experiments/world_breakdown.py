"""World answers broken down by how many shapes the asked picture holds.

Accuracy by question type alone cannot tell a model that does not see an attribute from one that sees it and
cannot bind it to the object a question names: the colour of a lone shape needs no binding, the colour of the
square among three does. ``benchmarks/world_diagnose.py by-objects`` prints this for a finished ``mim world``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from mim.evaluation.held_out import chosen_answer

#: question types about one picture's objects, and "which" (counted by pictures instead)
BROKEN_DOWN = ("colour", "shape", "count", "position", "which")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def answers_by_objects(conversations: str | Path, scenes: str | Path, answers: str | Path
                       ) -> dict[tuple[str, int], tuple[int, int]]:
    """``(type, n) -> (right, turns)`` for a split's keyed turns, ``n`` the shapes in the asked picture (the
    pictures shown, for "which"). A turn is right as ``mim evaluate`` scores it: the first choice its reply
    names is the key's answer. ``answers`` is ``mim evaluate``'s ``answers.jsonl`` for ``conversations``."""
    shapes = {f"{record['id']}.png": len(record["objects"]) for record in _jsonl(scenes)}
    records = {record["id"]: record for record in _jsonl(conversations)}
    counts: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
    for answer in _jsonl(answers):
        if answer.get("error"):
            continue
        conversation, turn = answer["key"].rsplit("/", 1)
        record = records[conversation]
        key = next((k for k in record["meta"]["answers"] if k["turn"] == int(turn)), None)
        if key is None or key["type"] not in BROKEN_DOWN:
            continue
        images = record["conversation"][int(turn) - 1]["image_list"]
        n = len(images) if key["type"] == "which" else shapes[images[0]]
        cell = counts[(key["type"], n)]
        cell[0] += chosen_answer(answer["text"], [str(c) for c in key["choices"]]) == str(key["answer"])
        cell[1] += 1
    return {key: (right, turns) for key, (right, turns) in sorted(counts.items())}
