"""Conversations about the world whose answers are known: the stage-2 data of the world experiment.

Question types (each answer stored in ``meta.answers`` with the turn it belongs to and the choices a
guess would pick from, so evaluation can score it and state chance):

- ``colour``: "What colour is the circle? <image>" (a picture with one circle) -> "It is blue."
- ``shape``: "What shape is the orange object? <image>" -> "It is a square."
- ``count``: "How many shapes are in this picture? <image>" -> "There are two shapes."
- ``position``: "Where is the green square? <image>" -> "It is on the left." (or "in the centre")
- ``which``: two or three pictures, exactly one of which holds a described shape -> "The second one."
- ``recall``: a later turn asks about a picture shown in an earlier turn -> the count of that picture.
- ``draw``: "Show me a small red triangle on a white background." -> "Here it is: <image>", the picture as the
  assistant's image with its caption (the image-generation turns the heads learn).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from synth.world.scenes import COLOURS, NUMBER_WORDS, POSITIONS, SHAPES, Scene

ORDINALS = ("first", "second", "third")
QUESTION_TYPES = ("colour", "shape", "count", "position", "which", "recall", "draw")


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _where(position: str) -> str:
    return "in the centre" if position == "centre" else f"on the {position}"


def _unique(scene: Scene, attribute: str) -> list:
    values = [getattr(o, attribute) for o in scene.objects]
    return [o for o in scene.objects if values.count(getattr(o, attribute)) == 1]


def _single(scene: Scene, kind: str, rng: np.random.Generator) -> tuple[str, str, dict] | None:
    """(question, reply, answer record) about one picture, or None when the picture cannot pose it."""
    if kind == "colour":
        objects = _unique(scene, "shape")
        if not objects:
            return None
        obj = objects[int(rng.integers(len(objects)))]
        return (f"What colour is the {obj.shape}? <image>", f"It is {obj.colour}.",
                {"type": "colour", "answer": obj.colour, "choices": list(COLOURS)})
    if kind == "shape":
        objects = _unique(scene, "colour")
        if not objects:
            return None
        obj = objects[int(rng.integers(len(objects)))]
        return (f"What shape is the {obj.colour} object? <image>", f"It is {_a(obj.shape)}.",
                {"type": "shape", "answer": obj.shape, "choices": list(SHAPES)})
    if kind == "count":
        word = NUMBER_WORDS[scene.count]
        reply = "There is one shape." if scene.count == 1 else f"There are {word} shapes."
        return ("How many shapes are in this picture? <image>", reply,
                {"type": "count", "answer": word, "choices": list(NUMBER_WORDS.values())})
    if kind == "position":
        obj = scene.objects[int(rng.integers(scene.count))]
        return (f"Where is the {obj.colour} {obj.shape}? <image>", f"It is {_where(obj.position)}.",
                {"type": "position", "answer": obj.position, "choices": list(POSITIONS)})
    raise ValueError(kind)


def _which(scenes: list[Scene], rng: np.random.Generator) -> tuple[str, str, dict] | None:
    """A described shape that exactly one of the pictures holds."""
    # lists in drawing order, not sets: a set of strings iterates in an order PYTHONHASHSEED picks, and the
    # candidates' order decides which one the seeded generator takes
    pairs = [list(dict.fromkeys((o.colour, o.shape) for o in scene.objects)) for scene in scenes]
    candidates = [(index, pair) for index, own in enumerate(pairs) for pair in own
                  if sum(pair in other for other in pairs) == 1]
    if not candidates:
        return None
    index, (colour, shape) = candidates[int(rng.integers(len(candidates)))]
    tags = " ".join("<image>" for _ in scenes)
    return (f"Which of these pictures has {_a(colour)} {shape}? {tags}", f"The {ORDINALS[index]} one.",
            {"type": "which", "answer": ORDINALS[index], "choices": list(ORDINALS[:len(scenes)])})


def _draw_request(scene: Scene, rng: np.random.Generator) -> str:
    things = [f"a {o.size} {o.colour} {o.shape} {_where(o.position)}" for o in scene.objects]
    listed = things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]
    opening = ("Show me", "Can you draw", "Please make a picture of")[int(rng.integers(3))]
    return f"{opening} {listed}, on a {scene.background} background."


def world_conversation(scenes: list[Scene], rng: np.random.Generator, conversation_id: str,
                       image_dir: str | None = None) -> dict[str, Any]:
    """One conversation of one to three exchanges over ``scenes`` (their pictures named ``ID.png``)."""
    turns: list[dict[str, Any]] = []
    answers: list[dict[str, Any]] = []
    shown: list[Scene] = []
    pool = list(scenes)
    exchanges = int(rng.integers(1, 4))
    for _ in range(exchanges):
        kind = QUESTION_TYPES[int(rng.integers(len(QUESTION_TYPES)))]
        posed = None
        if kind == "which" and len(pool) >= 2:
            group = [pool.pop() for _ in range(min(len(pool), int(rng.integers(2, 4))))]
            posed = _which(group, rng)
            images = [f"{s.id}.png" for s in group]
            shown += group
        elif kind == "recall" and shown:
            earlier = shown[0]
            word = NUMBER_WORDS[earlier.count]
            posed = ("In the first picture I showed you, how many shapes were there?",
                     "There was one shape." if earlier.count == 1 else f"There were {word} shapes.",
                     {"type": "recall", "answer": word, "choices": list(NUMBER_WORDS.values())})
            images = []
        elif kind == "draw" and pool:
            scene = pool.pop()
            turns.append({"role": "user", "content": _draw_request(scene, rng), "image_list": []})
            turns.append({"role": "assistant", "content": "Here it is: <image>", "image_list": [f"{scene.id}.png"],
                          "caption_list": [scene.caption]})
            answers.append({"turn": len(turns) - 1, "type": "draw", "answer": scene.caption, "scene": scene.id})
            continue
        elif pool and kind in ("colour", "shape", "count", "position"):
            scene = pool.pop()
            posed = _single(scene, kind, rng)
            images = [f"{scene.id}.png"]
            shown.append(scene)
        if posed is None:
            continue
        question, reply, answer = posed
        turns.append({"role": "user", "content": question, "image_list": images})
        turns.append({"role": "assistant", "content": reply, "image_list": []})
        answers.append({"turn": len(turns) - 1, **answer})
    record: dict[str, Any] = {"id": conversation_id, "conversation": turns, "meta": {"answers": answers}}
    if image_dir is not None:
        record["image_dir"] = image_dir
    return record


def write_conversations(scenes: dict[str, Scene], path: str | os.PathLike[str], count: int, seed: int = 0,
                        image_dir: str | None = None, prefix: str = "world") -> Path:
    """``count`` conversations over the (matched) ``scenes``, to ``path`` as TextBind-format JSONL."""
    from synth.atomic import atomic_write_text

    rng = np.random.default_rng(seed)
    usable = [scene for scene in scenes.values() if not scene.mismatched]
    if len(usable) < 3:
        raise ValueError(f"{len(usable)} matched scenes; a world conversation needs at least 3")
    lines = []
    while len(lines) < count:
        chosen = [usable[i] for i in rng.choice(len(usable), size=min(len(usable), 6), replace=False)]
        record = world_conversation(chosen, rng, f"{prefix}-{len(lines):06d}", image_dir)
        if record["meta"]["answers"]:
            lines.append(json.dumps(record) + "\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(lines))
    return path


def swapped_which(record: dict[str, Any]) -> dict[str, Any]:
    """The same conversation with the pictures of every "which" question in reverse order and its answer
    moved with them: a model that reads the pictures follows the swap, one that guesses does not."""
    turns = [dict(turn) for turn in record["conversation"]]
    answers = []
    for key in record.get("meta", {}).get("answers", []):
        key = dict(key)
        if key.get("type") == "which":
            question = turns[key["turn"] - 1]
            question["image_list"] = list(reversed(question["image_list"]))
            position = len(question["image_list"]) - 1 - ORDINALS.index(key["answer"])
            key["answer"] = ORDINALS[position]
            turns[key["turn"]]["content"] = f"The {ORDINALS[position]} one."
        answers.append(key)
    return {**record, "id": f"{record['id']}-swapped", "conversation": turns,
            "meta": {**record.get("meta", {}), "answers": answers}}
