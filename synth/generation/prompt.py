"""The generation prompt (paper Appendix A, Figure 10) and in-context example selection (section 3.3).

The prompt text is Appendix A's, word for word; the PDF's bold and code
formatting marks (``**``, backticks) are typesetting, not words, and are not
sent. Images are written ``<imgX> DESCRIPTION </imgX>``, X counting from 0.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

#: Table 2's labels.
QUALITY_LABELS = ("Excellent", "Satisfactory", "Poor")
CHARACTERISTICS = ("Image Creation", "Image Comparison", "Intrinsic Image Understanding",
                   "Extrinsic Image Understanding")
SEED_SET_FILE = Path(__file__).resolve().parent / "seeds" / "appendix_b.jsonl"

_HEADER = """Please construct a dialogue between a human and a helpful, honest and harmless assistant. The dialogue contains interleaved text and images. Each image is represented by <imgX> DESCRIPTION </imgX>, where DESCRIPTION is a textual description of the image and X is an index of the image. Please do not assume any further visual information beyond the description.

The constructed dialogues must and can only contain the following input images:

{images}

Characteristics about the assistant:

1. The assistant is trained to understand text, images, and their combinations.
2. The assistant can reply the human with images and/or text.
3. The assistant has exceptional world knowledge and commonsense reasoning capabilities.
4. The assistant does not have access to the Internet or any other external tools.
5. If the assistant is asked to create an image, it can only show the image in the provided image list.
6. Please do not copy the images appearing in the dialogue. The assistant should refer to the previously mentioned image by natural language.

Characteristics about the human:

1. The human may send images and/or text to the assistant.
2. The human may ask questions requiring visual reasoning and/or understanding the relations between multiple images.
3. The human may ask the assistant to show images based on his/her intention.
4. The human may ask the assistant to do interesting things, rather than simply describing the content of the image.

Properties of a bad dialogue:

1. Simply describing or analyzing the content in the image.
2. Dialogue without a good logic.

Properties of a good dialogue:

1. Introducing extrinsic and attractive information of stuff shown in the image.
2. Discovering the connection between multiple images.
3. The dialogue happens in a reasonable context.

Examples:

=====

{examples}

=====

Please directly give the dialogue if you understand. The number of turns of the dialogue should be less than 6. The dialogue should be self-contained. Do NOT assume any previous dialogue between the human and the assistant. Please use the same format <imgX> DESCRIPTION </imgX> to denote images in the dialogue and do not modify the description of the image. Note that the dialogue can stop at any time without an explicit ending."""

_CASE = """Case {number}:

Input Images: {images}

Output Dialogue: {dialogue}"""


def image_tag(index: int, description: str) -> str:
    return f"<img{index}> {description} </img{index}>"


def image_list(captions: Sequence[str]) -> str:
    return "\n".join(image_tag(index, caption) for index, caption in enumerate(captions))


@dataclass
class SeedExample:
    """A labelled conversation in raw generation format: the seed set's and the annotate tool's record."""

    id: str
    captions: list[str]  # the input images, in <imgX> order
    dialogue: str  # "Human: ... Assistant: ..." with <imgX> DESCRIPTION </imgX> tags
    quality: str
    characteristics: list[str] = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        if self.quality not in QUALITY_LABELS:
            raise ValueError(f"seed {self.id!r}: quality must be one of {QUALITY_LABELS}, got {self.quality!r}")
        unknown = sorted(set(self.characteristics) - set(CHARACTERISTICS))
        if unknown:
            raise ValueError(f"seed {self.id!r}: unknown characteristics {unknown}; known: {CHARACTERISTICS}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


def read_seed_set(path: str | os.PathLike[str] = SEED_SET_FILE) -> list[SeedExample]:
    seeds = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    seeds.append(SeedExample(**json.loads(line)))
                except (json.JSONDecodeError, TypeError, ValueError, RecursionError) as error:
                    raise ValueError(f"{path}:{number}: not a seed example: {error or type(error).__name__}"
                                     ) from None
    return seeds


def choose_examples(seeds: Sequence[SeedExample], rng: random.Random, k: int = 3,
                    max_tries: int = 1000) -> list[SeedExample]:
    """k examples with at least one "Excellent" that together cover all four characteristics (section 3.3).

    Only Excellent and Satisfactory seeds are candidates. Random draws are tried
    first (for diversity across prompts); if none satisfies the constraints,
    the satisfying combinations are enumerated, and if there are none the
    error says what the seed set lacks.
    """
    pool = [seed for seed in seeds if seed.quality in ("Excellent", "Satisfactory")]
    if len(pool) < k:
        raise ValueError(f"the seed set has {len(pool)} Excellent/Satisfactory examples; {k} are needed")

    def ok(chosen: Sequence[SeedExample]) -> bool:
        covered = {c for seed in chosen for c in seed.characteristics}
        return any(seed.quality == "Excellent" for seed in chosen) and covered >= set(CHARACTERISTICS)

    for _ in range(max_tries):
        chosen = rng.sample(pool, k)
        if ok(chosen):
            return chosen
    from itertools import combinations

    valid = [list(c) for c in combinations(pool, k) if ok(c)]
    if not valid:
        covered = sorted({c for seed in pool for c in seed.characteristics})
        raise ValueError(f"no {k} seed examples include an 'Excellent' one and cover all of {CHARACTERISTICS}; "
                         f"the seed set covers {covered}. Annotate more conversations (`synth annotate`).")
    return rng.choice(valid)


def render_prompt(captions: Sequence[str], examples: Sequence[SeedExample]) -> str:
    """Appendix A's prompt for one image group, with its in-context examples."""
    cases = [_CASE.format(number=number, images=image_list(example.captions), dialogue=example.dialogue.strip())
             for number, example in enumerate(examples, start=1)]
    return _HEADER.format(images=image_list(captions), examples="\n\n".join(cases))


def render_template(captions: Sequence[str], examples: Sequence[tuple[str, str]]) -> str:
    """The prompt with literal example text (for comparing against the appendix, where they read ``...``)."""
    cases = [_CASE.format(number=number, images=images, dialogue=dialogue)
             for number, (images, dialogue) in enumerate(examples, start=1)]
    return _HEADER.format(images=image_list(captions), examples="\n\n".join(cases))
