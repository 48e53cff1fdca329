"""The exact tests behind the answer-key figures: checked against scipy and brute-force enumeration."""

from __future__ import annotations

import itertools

import pytest
from scipy import stats

from mim.evaluation.significance import above_chance_p, paired_p


def test_above_chance_is_the_binomial_tail_when_every_turn_has_the_same_chance() -> None:
    for right, n, chance in ((0, 20, 0.25), (9, 20, 0.25), (14, 30, 1 / 3), (30, 30, 1 / 6)):
        outcomes = [True] * right + [False] * (n - right)
        assert above_chance_p(outcomes, [chance] * n) == pytest.approx(stats.binom.sf(right - 1, n, chance), rel=1e-9)


def test_above_chance_with_mixed_chances_is_the_enumerated_tail() -> None:
    chances = [1 / 3, 1 / 6, 1 / 4, 1 / 2, 1 / 3, 1 / 6, 1 / 5]
    for right in range(len(chances) + 1):
        tail = 0.0
        for guesses in itertools.product((False, True), repeat=len(chances)):
            if sum(guesses) >= right:
                probability = 1.0
                for guessed, chance in zip(guesses, chances):
                    probability *= chance if guessed else 1 - chance
                tail += probability
        outcomes = [True] * right + [False] * (len(chances) - right)
        assert above_chance_p(outcomes, chances) == pytest.approx(tail, rel=1e-9, abs=1e-15)


def test_above_chance_refuses_what_it_cannot_test() -> None:
    with pytest.raises(ValueError, match="2 outcomes but 1 chances"):
        above_chance_p([True, False], [0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        above_chance_p([True], [1.5])


def test_paired_counts_only_the_turns_the_runs_disagree_on() -> None:
    first = {f"t{i}": True for i in range(12)} | {"x": False, "shared-only-here": True}
    second = {f"t{i}": i < 2 for i in range(12)} | {"x": True, "other": False}
    result = paired_p(first, second)
    # t2..t11 go the first run's way (10), x the second's (1); t0, t1 agree; unshared keys do not count
    assert (result["turns"], result["only_first"], result["only_second"]) == (13, 10, 1)
    assert result["p"] == pytest.approx(stats.binom.sf(9, 11, 0.5), rel=1e-12)
    reverse = paired_p(second, first)
    assert reverse["p"] == pytest.approx(stats.binom.sf(0, 11, 0.5), rel=1e-12) and reverse["p"] > 0.99


def test_paired_on_identical_runs_is_no_evidence() -> None:
    same = {"a": True, "b": False}
    assert paired_p(same, dict(same))["p"] == 1.0
    with pytest.raises(ValueError, match="share no turn"):
        paired_p({"a": True}, {"b": True})
