"""Pictures a model can tell apart, and questions about them whose answers are known.

A coloured square of random size and place on a noisy grey background: to name its colour a model
has to look at the picture (the background carries nothing, the square moves). Used by the tests that
check image content reaches the model, and by the "learns to see" smoke test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (30, 60, 220), "yellow": (230, 210, 30)}
#: The blanked picture: what every question sees when the pictures are taken away.
GREY = (128, 128, 128)


def square(colour: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    background = rng.integers(90, 160)
    pixels = np.clip(rng.normal(background, 20, (size, size, 3)), 0, 255)
    side = int(rng.integers(size * 3 // 8, size * 3 // 4 + 1))
    x, y = rng.integers(0, size - side + 1, 2)
    pixels[y:y + side, x:x + side] = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 15, (side, side, 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def blank(size: int = 32) -> Image.Image:
    return Image.new("RGB", (size, size), GREY)


def colour_questions(count: int, folder: Path, seed: int) -> Path:
    """``count`` TextBind-format conversations under ``folder``: even ones ask the colour of one square
    ("It is red."), odd ones the colours of two squares in order ("red and blue.", never the same
    colour twice, so swapping the pictures changes the answer). ``meta.answer`` holds the colours."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    records = []
    for index in range(count):
        if index % 2 == 0:
            colours = [names[rng.integers(len(names))]]
            question, reply = "What colour is the square? <image>", f"It is {colours[0]}."
        else:
            first = names[rng.integers(len(names))]
            colours = [first, names[(names.index(first) + rng.integers(1, len(names))) % len(names)]]
            question, reply = "What colours are these two squares? <image> <image>", f"{colours[0]} and {colours[1]}."
        images = []
        for position, colour in enumerate(colours):
            name = f"{index:04d}_{position}.png"
            square(colour, rng).save(folder / name)
            images.append(name)
        records.append({"id": f"colours-{index:04d}", "conversation": [
            {"role": "user", "content": question, "image_list": images},
            {"role": "assistant", "content": reply, "image_list": []}], "meta": {"answer": colours}})
    path = folder / "conversations.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def colours_named(text: str) -> list[str]:
    """The colour words in a reply, in order."""
    return re.findall("|".join(COLOURS), text)
