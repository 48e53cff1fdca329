"""Stage 4, sample: topic-aware image groups (sections 3.2, 4.1).

A group is made by picking a cluster uniformly at random among the kept ones,
then n images from it, n drawn uniformly from ``group_sizes`` ({2, 3, 4} in
section 4.1). The same set of images is never used twice. A seeded generator
makes the groups reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ImageGroup:
    group_id: str
    cluster: int
    pair_ids: tuple[str, ...]


def sample_groups(pair_ids: Sequence[str], assignments: np.ndarray, kept_clusters: Sequence[int],
                  num_groups: int, group_sizes: Sequence[int] = (2, 3, 4), seed: int = 0,
                  max_attempts_per_group: int = 100) -> list[ImageGroup]:
    """Up to ``num_groups`` distinct groups; fewer only when the clusters run out of new combinations.

    A draw that repeats an earlier group, or asks for more images than its
    cluster has, is retried; after ``max_attempts_per_group`` failed draws in a
    row sampling stops, so a small corpus cannot loop forever.
    """
    if not group_sizes or min(group_sizes) < 1:
        raise ValueError(f"group_sizes must be positive integers, got {list(group_sizes)}")
    if len(pair_ids) != len(assignments):
        raise ValueError(f"{len(pair_ids)} pair ids but {len(assignments)} cluster assignments")
    members = {int(c): np.flatnonzero(assignments == c) for c in kept_clusters}
    members = {c: index for c, index in members.items() if len(index) >= min(group_sizes)}
    if not members:
        raise ValueError(f"no kept cluster has at least {min(group_sizes)} images to sample a group from")
    clusters = sorted(members)
    rng = np.random.default_rng(seed)
    seen: set[frozenset[int]] = set()
    groups: list[ImageGroup] = []
    failures = 0
    while len(groups) < num_groups and failures < max_attempts_per_group:
        cluster = clusters[rng.integers(len(clusters))]
        n = int(group_sizes[rng.integers(len(group_sizes))])
        if n > len(members[cluster]):
            failures += 1
            continue
        chosen = rng.choice(members[cluster], size=n, replace=False)
        key = frozenset(int(i) for i in chosen)
        if key in seen:
            failures += 1
            continue
        seen.add(key)
        failures = 0
        groups.append(ImageGroup(f"g{len(groups):07d}", cluster, tuple(pair_ids[i] for i in chosen)))
    return groups
