"""Exact tests for answer keys: is an accuracy above guessing, and do two runs over the same turns differ.

A fixed margin ("0.15 above chance") means one thing at 1,000 turns and another at 100, and a blank-picture
control that lands 0.05 above chance on 174 turns is noise, not a language prior. These tests say how
surprising a result is under the null, exactly, for the few hundred turns an evaluation on a CPU has.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import comb

import numpy as np


def above_chance_p(right: Sequence[bool], chance: Sequence[float]) -> float:
    """One-sided p-value of getting at least ``sum(right)`` turns right by guessing, where turn i is
    guessed right with probability ``chance[i]`` (one over its number of choices): the exact
    Poisson-binomial tail, because the turns' chances differ (three choices for position, six for colour)."""
    if len(right) != len(chance):
        raise ValueError(f"{len(right)} outcomes but {len(chance)} chances")
    if any(not 0.0 <= p <= 1.0 for p in chance):
        raise ValueError("every chance must lie in [0, 1]")
    distribution = np.zeros(len(chance) + 1)
    distribution[0] = 1.0
    for k, p in enumerate(chance, start=1):  # distribution of the count of right guesses over the first k turns
        distribution[1:k + 1] = distribution[1:k + 1] * (1 - p) + distribution[:k] * p
        distribution[0] *= 1 - p
    return float(min(1.0, distribution[int(sum(right)):].sum()))


def paired_p(first: Mapping[str, bool], second: Mapping[str, bool]) -> dict[str, float | int]:
    """Exact one-sided McNemar test that ``first`` answers more of the shared turns right than ``second``
    (e.g. with the pictures against with them blanked): only the turns on which the two disagree count,
    and under the null each is as likely to go either way."""
    shared = sorted(set(first) & set(second))
    if not shared:
        raise ValueError("the two runs share no turn to compare")
    only_first = sum(first[key] and not second[key] for key in shared)
    only_second = sum(second[key] and not first[key] for key in shared)
    disagreements = only_first + only_second
    tail = sum(comb(disagreements, k) for k in range(only_first, disagreements + 1))
    return {"turns": len(shared), "only_first": only_first, "only_second": only_second,
            "p": tail / 2 ** disagreements}
