"""Does a CLIP tell a red square from a red circle? Captions with one word changed, and how often a picture
scores its own caption above them.

A contrastive model trained with in-batch negatives learns only the differences its batches happen to hold
(Yuksekgonul et al., ICLR 2023, "When and why vision-language models behave like bags-of-words"). Two captions
of a batch rarely differ by one shape word alone, so such a model can match pictures to captions well (the
world CLIP's match filter rejects 97% of the mismatched pairs) while barely seeing shape. The world's vision
tower and Q-Former are pre-trained against this CLIP's caption features, so what it cannot tell apart, no part
learns before MIM's own stages. Measured (docs/world.md; ``benchmarks/world_diagnose.py caption-preference``):
the world CLIP trained 600 steps on 3,000 pictures prefers a picture's own caption over the one with its shape
changed 0.70 of the time (colour 0.92); 250 steps on 1,500 pictures, 0.57.

The changes are NegCLIP's two word-level perturbations:

- ``replace``: one word of a class (a shape, a colour, a size) becomes another word of the same class;
- ``swap``: two different words of one class trade places (which colour goes with which shape).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _occurrences(caption: str, vocabularies: Mapping[str, Sequence[str]]) -> dict[str, list[re.Match]]:
    found = {}
    for name, words in vocabularies.items():
        pattern = r"\b(" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")\b"
        matches = list(re.finditer(pattern, caption))
        if matches:
            found[name] = matches
    return found


def changed_caption(caption: str, vocabularies: Mapping[str, Sequence[str]], rng: np.random.Generator) -> str | None:
    """``caption`` with one ``replace`` or ``swap`` of words from ``vocabularies`` (class name -> its words),
    chosen uniformly among those possible; None when no word of any class can change. Never ``caption``."""
    found = _occurrences(caption, vocabularies)
    options: list[tuple[str, str]] = []
    for name, matches in found.items():
        if len(vocabularies[name]) > 1:
            options.append(("replace", name))
        if len({m.group(0) for m in matches}) > 1:
            options.append(("swap", name))
    if not options:
        return None
    kind, name = options[int(rng.integers(len(options)))]
    matches = found[name]
    if kind == "replace":
        match = matches[int(rng.integers(len(matches)))]
        others = [w for w in vocabularies[name] if w != match.group(0)]
        edits = {match.span(): others[int(rng.integers(len(others)))]}
    else:
        first = matches[int(rng.integers(len(matches)))]
        partners = [m for m in matches if m.group(0) != first.group(0)]
        second = partners[int(rng.integers(len(partners)))]
        edits = {first.span(): second.group(0), second.span(): first.group(0)}
    pieces, end = [], 0
    for (start, stop), word in sorted(edits.items()):
        pieces += [_article(caption[end:start], word), word]
        end = stop
    return "".join(pieces) + caption[end:]


def _article(before: str, word: str) -> str:
    """``before`` with an indefinite article just before ``word`` agreeing with it: "an yellow" would give a
    changed caption away by its grammar alone."""
    match = re.search(r"\b(a|an)(\s+)$", before)
    if not match:
        return before
    return before[:match.start()] + ("an" if word[:1] in "aeiou" else "a") + match.group(2)


def world_vocabularies() -> dict[str, tuple[str, ...]]:
    """The world's attribute words that captions state: shape, colour, size."""
    from synth.world.scenes import COLOURS, SHAPES, SIZES

    return {"shape": SHAPES, "colour": tuple(COLOURS), "size": SIZES}


def caption_preference(clip: Any, pictures: Sequence[Any], captions: Sequence[str],
                       vocabularies: Mapping[str, Sequence[str]] | None = None, seed: int = 0) -> dict[str, float]:
    """By class of word: the share of ``pictures`` that ``clip`` (anything with ``match_scores(pictures,
    captions)``, e.g. :class:`synth.model_parts.clip.ClipBundle`) scores with their own caption above the same
    caption with one word of that class changed. Chance is 0.5; a tie counts as no preference. Classes no
    caption names are left out."""
    vocabularies = vocabularies or world_vocabularies()
    rng = np.random.default_rng([seed, 29])
    own = np.asarray(clip.match_scores(list(pictures), list(captions)))
    preference = {}
    for name, words in vocabularies.items():
        changed = [changed_caption(caption, {name: words}, rng) for caption in captions]
        kept = [i for i, caption in enumerate(changed) if caption is not None]
        if kept:
            other = np.asarray(clip.match_scores([pictures[i] for i in kept], [changed[i] for i in kept]))
            preference[name] = round(float((own[kept] > other).mean()), 4)
    return preference

