"""Scenes of the world: 1-3 shapes on a plain background, every attribute recorded.

Attributes a caption can state and a question can ask: shape (circle, square, triangle, diamond), colour
(red, green, blue, yellow, purple, orange), size (small, large), position (left, centre, right), how many
shapes, and the background (white, grey, black). The design was fixed before any model was trained on it.

Held out: one colour per shape (four colour-shape pairs, :data:`HELD_OUT_PAIRS`) appears in no training
picture and no training caption; the ``held_out`` split contains at least one of them in every picture,
to measure compositional generalisation (each colour and each shape is seen in training, not together).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (230, 200, 30),
           "purple": (140, 60, 170), "orange": (240, 130, 20)}
SIZES = ("small", "large")
POSITIONS = ("left", "centre", "right")
BACKGROUNDS = {"white": (245, 245, 245), "grey": (128, 128, 128), "black": (20, 20, 20)}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
#: Colour-shape pairs no training picture or text contains, one per shape and each with its own colour:
#: every colour and every shape still appears in training, just never these together.
HELD_OUT_PAIRS = frozenset({("red", "circle"), ("blue", "square"), ("yellow", "triangle"), ("purple", "diamond")})
SPLITS = ("train", "held_out")


@dataclass(frozen=True)
class WorldObject:
    shape: str
    colour: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    """A picture's full record; ``caption`` is what its pair says (another scene's when ``mismatched``)."""

    id: str
    objects: tuple[WorldObject, ...]
    background: str
    split: str
    caption: str = ""
    mismatched: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.objects)

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "Scene":
        return cls(record["id"], tuple(WorldObject(**o) for o in record["objects"]), record["background"],
                   record["split"], record.get("caption", ""), record.get("mismatched", False),
                   record.get("extra", {}))


def is_held_out(colour: str, shape: str) -> bool:
    return (colour, shape) in HELD_OUT_PAIRS


def sample_scene(rng: np.random.Generator, scene_id: str, split: str = "train") -> Scene:
    """1-3 objects in distinct positions, distinct colour-shape pairs. ``train`` never holds a held-out
    pair; ``held_out`` always holds at least one."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    while True:
        count = int(rng.integers(1, 4))
        positions = list(rng.choice(POSITIONS, size=count, replace=False))
        objects, pairs = [], set()
        for position in sorted(positions, key=POSITIONS.index):  # left to right: captions read in order
            colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
            objects.append(WorldObject(shape, colour, str(rng.choice(SIZES)), str(position)))
            pairs.add((colour, shape))
        if len(pairs) < count:
            continue
        held = any(is_held_out(c, s) for c, s in pairs)
        if (split == "held_out") == held:
            return Scene(scene_id, tuple(objects), str(rng.choice(list(BACKGROUNDS))), split)


def _describe(obj: WorldObject, rng: np.random.Generator) -> str:
    if rng.random() < 0.7:
        return f"a {obj.size} {obj.colour} {obj.shape}"
    return f"{'an' if obj.colour[0] in 'aeiou' else 'a'} {obj.colour} {obj.shape}"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A CC3M-style caption (lower case, no final stop) from one of several phrasings."""
    things = [_describe(o, rng) for o in scene.objects]
    listed = things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]
    phrasings = [
        f"{listed} on a {scene.background} background",
        f"illustration of {listed}",
        f"{NUMBER_WORDS[scene.count]} shape{'s' if scene.count > 1 else ''} : {listed}",
        f"{listed} isolated on {scene.background}",
        f"simple vector graphic of {listed} against a {scene.background} backdrop",
    ]
    return phrasings[int(rng.integers(len(phrasings)))]


def render(scene: Scene, size: int = 64):
    """The picture, at ``size`` x ``size`` (the vision tower's resolution)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    column = size / 3
    for obj in scene.objects:
        radius = column * (0.42 if obj.size == "large" else 0.24)
        cx, cy = column * (POSITIONS.index(obj.position) + 0.5), size / 2
        fill = COLOURS[obj.colour]
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
        else:  # diamond
            draw.polygon([(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)], fill=fill)
    return image


def world_pairs(count: int, seed: int = 0, split: str = "train", mismatched: float = 0.0,
                prefix: str | None = None) -> Iterator[Scene]:
    """``count`` scenes with captions, deterministic from ``seed`` and ``split``; a ``mismatched`` share of
    them carry the caption of a different scene (recorded: the CLIP filter of section 3.2 must reject them)."""
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    prefix = prefix or f"world-{split}-{seed}"
    scenes = [sample_scene(rng, f"{prefix}-{index:06d}", split) for index in range(count)]
    captions = [caption(scene, rng) for scene in scenes]
    for index, scene in enumerate(scenes):
        if count > 1 and rng.random() < mismatched:
            other = (index + int(rng.integers(1, count))) % count
            def kinds(s: Scene) -> set[tuple[str, str]]:
                return {(o.colour, o.shape) for o in s.objects}

            while kinds(scenes[other]) == kinds(scene):  # a caption that names other shapes: truly wrong
                other = (other + 1) % count
                if other == index:
                    break
            yield Scene(scene.id, scene.objects, scene.background, split, captions[other], True)
        else:
            yield Scene(scene.id, scene.objects, scene.background, split, captions[index], False)


def write_world(folder: str | os.PathLike[str], count: int, seed: int = 0, split: str = "train",
                mismatched: float = 0.0, image_size: int = 64) -> Path:
    """Render ``count`` scenes into ``folder`` and record them in ``folder/scenes.jsonl`` (id, attributes,
    caption, mismatched, image). Resumable: a picture already there is kept; the records are rewritten."""
    from synth.atomic import atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for scene in world_pairs(count, seed, split, mismatched):
        image = folder / f"{scene.id}.png"
        if not image.is_file():
            render(scene, image_size).save(image)
        lines.append(json.dumps({**scene.record(), "image": image.name}) + "\n")
    atomic_write_text(folder / "scenes.jsonl", "".join(lines))
    return folder / "scenes.jsonl"


def read_scenes(path: str | os.PathLike[str]) -> dict[str, Scene]:
    """The scenes a :func:`write_world` folder records, by id."""
    scenes = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            scene = Scene.from_record(json.loads(line))
            scenes[scene.id] = scene
    return scenes
