"""Captions with one word changed (NegCLIP's replace and swap, the grammar kept) and the check of what a CLIP
tells apart with them."""

from __future__ import annotations

import re

import numpy as np

from synth.world.caption_checks import caption_preference, changed_caption, world_vocabularies
from synth.world.scenes import SHAPES


def _words(caption: str) -> list[str]:
    return re.findall(r"[a-z]+", caption)


def test_a_changed_caption_replaces_one_attribute_word_or_trades_two_and_keeps_the_rest() -> None:
    rng = np.random.default_rng(0)
    vocabularies = world_vocabularies()
    caption = "two shapes : a small red square and an orange circle on a white background"
    kinds = set()
    for _ in range(200):
        changed = changed_caption(caption, vocabularies, rng)
        assert changed is not None and changed != caption
        before, after = _words(caption), _words(changed)
        assert len(before) == len(after)
        differ = [i for i, (a, b) in enumerate(zip(before, after)) if a != b and a not in ("a", "an")]
        classes = {next(name for name, words in vocabularies.items() if before[i] in words) for i in differ}
        assert len(classes) == 1  # one class of word changed, nothing else
        (name,) = classes
        assert all(after[i] in vocabularies[name] for i in differ)
        if len(differ) == 2:  # a trade: the same words, which object has which swapped
            assert sorted(before[i] for i in differ) == sorted(after[i] for i in differ)
            kinds.add(("swap", name))
        else:
            assert len(differ) == 1
            kinds.add(("replace", name))
        # the article agrees with the word after it, so grammar never gives a changed caption away
        for article, word in re.findall(r"\b(a|an) ([a-z]+)", changed):
            assert article == ("an" if word[0] in "aeiou" else "a"), changed
    # every change this caption allows is drawn (its one size word can be replaced, not traded)
    assert kinds == {("replace", "shape"), ("replace", "colour"), ("replace", "size"), ("swap", "shape"),
                     ("swap", "colour")}


def test_nothing_to_change_gives_none_and_the_draw_follows_the_seed() -> None:
    vocabularies = world_vocabularies()
    assert changed_caption("a photo of the sea", vocabularies, np.random.default_rng(0)) is None
    # a one-word class cannot be replaced, and a word cannot be traded with itself
    assert changed_caption("a red square", {"shape": ("square",)}, np.random.default_rng(0)) is None
    caption = "a large blue circle and a small green diamond"
    draws = [changed_caption(caption, vocabularies, np.random.default_rng(3)) for _ in range(2)]
    assert draws[0] == draws[1]


class _ShapeBlindScorer:
    """Scores a caption 1 when it says what the picture's own caption says, shapes left out: it cannot see them."""

    def __init__(self, truth: dict[str, str]) -> None:
        self.truth = truth  # picture -> its caption (the pictures here are names)

    @staticmethod
    def _blind(text: str) -> str:
        return re.sub(r"\b(" + "|".join(SHAPES) + r")\b", "thing", text)

    def match_scores(self, pictures, captions) -> list[float]:
        return [float(self._blind(self.truth[p]) == self._blind(c)) for p, c in zip(pictures, captions)]


def test_caption_preference_changes_one_class_of_word_at_a_time() -> None:
    captions = ["a small red square on a white background", "illustration of a green circle",
                "a large blue triangle and an orange diamond isolated on black", "a photo of the sea"]
    pictures = [f"picture-{i}" for i in range(len(captions))]
    scorer = _ShapeBlindScorer(dict(zip(pictures, captions)))
    # a changed colour or size is told apart every time; a changed shape never (a tie is no preference); the
    # caption that names no attribute is left out of every class
    assert caption_preference(scorer, pictures, captions) == {"shape": 0.0, "colour": 1.0, "size": 1.0}
    assert caption_preference(scorer, pictures[3:], captions[3:]) == {}
