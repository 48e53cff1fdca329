"""Table 3 statistics and the section 4.3 diversity score on hand-counted data."""

from __future__ import annotations

import pytest

from synth.data.schema import Conversation, Turn
from synth.statistics.stats import dataset_stats, diversity


def conversation(*turns: Turn) -> Conversation:
    return Conversation(id="c", turns=list(turns))


def test_table3_counts_turn_pairs_images_and_words_by_role() -> None:
    data = [
        conversation(
            Turn("system", "ignored system words"),
            Turn("user", "look <image> here", ["a.png"]),
            Turn("assistant", "nice one: <image>", ["b.png"], ["a cat"]),
            Turn("user", "and <image> <image>", ["c.png", "d.png"]),
            Turn("assistant", "both fine"),
        ),
        conversation(Turn("user", "hello"), Turn("assistant", "hi there friend")),
    ]
    stats = dataset_stats(data)
    assert stats.conversations == 2
    assert stats.avg_turns == pytest.approx(3 / 2)  # a turn is an instruction-response pair
    assert stats.avg_images_in_instructions == pytest.approx(3 / 2)
    assert stats.avg_images_in_responses == pytest.approx(1 / 2)
    assert stats.avg_images == pytest.approx(4 / 2)
    # words without placeholders: user 2 + 1 + 1 = 4, assistant 2 + 2 + 3 = 7
    assert stats.avg_words_in_instructions == pytest.approx(4 / 2)
    assert stats.avg_words_in_responses == pytest.approx(7 / 2)
    assert stats.avg_words == pytest.approx(11 / 2)
    assert "# of conversations" in stats.table()


def test_stats_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="no conversations"):
        dataset_stats([])


def test_diversity_is_sum_of_unique_over_total_ngrams() -> None:
    # "a b a b": bigrams ab, ba, ab (2 unique / 3); trigrams aba, bab (2/2); 4-gram abab (1/1)
    assert diversity(["a b a b"]) == pytest.approx(2 / 3 + 1 + 1)
    assert diversity(["A B", "a b"]) == pytest.approx(1 / 2)  # lower-cased; only bigrams exist
    assert diversity(["<image> x y"]) == pytest.approx(1.0)  # placeholders are not words
