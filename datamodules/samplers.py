"""Which items an epoch visits, on each rank: a permutation, or draws with replacement (resampling).

Stage 1 of the released recipe streams CC3M+CC12M+SBU shards through
webdataset with ``resampled=True`` and ``with_epoch(10_000_000)``: every epoch
is 10M pairs drawn with replacement, whatever the corpus size, and every draw
gets a freshly chosen instruction template. :class:`EpochSampler` reproduces
that over an indexed dataset. Each index it yields is tagged with its epoch
(``epoch * size + item``), so a dataset can vary per epoch what it makes of
an item (the template) even inside DataLoader worker processes, which never
see ``set_epoch``.

It is a ``DistributedSampler``: under DDP, FSDP or DeepSpeed each rank draws
its own share lazily, and Lightning does not wrap it (its wrapper would first
materialise the whole epoch's index list on every rank).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler

_CHUNK = 1 << 16


def split_epoch(index: int, size: int) -> tuple[int, int]:
    """(item, epoch) of an index an :class:`EpochSampler` yielded."""
    return index % size, index // size


class EpochSampler(DistributedSampler):
    """This rank's indices for the epoch: ``epoch * len(dataset) + item`` with ``tag_epochs``, else ``item``.

    Args:
        dataset: what is sampled (only its length is used).
        draws: items per epoch over all ranks, drawn with replacement; None: every item once
            (a permutation with ``shuffle``, in order without).
        shuffle: permute (ignored with ``draws``: draws are random anyway).
        seed: the same seed and epoch give the same indices.
        tag_epochs: add ``epoch * len(dataset)`` to each index, for datasets that read it (split_epoch).
    """

    def __init__(self, dataset: Dataset, draws: int | None = None, shuffle: bool = True, seed: int = 0,
                 tag_epochs: bool = False) -> None:
        if draws is not None and draws < 1:
            raise ValueError(f"samples_per_epoch must be positive, got {draws}")
        replicas, rank = 1, 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            replicas, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        super().__init__(dataset, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.size = len(dataset)  # type: ignore[arg-type]
        if self.size == 0:
            raise ValueError("cannot sample from an empty dataset")
        self.draws = draws
        self.tag_epochs = tag_epochs

    def __len__(self) -> int:
        if self.draws is None:
            return super().__len__()
        return -(-self.draws // self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        offset = self.epoch * self.size if self.tag_epochs else 0
        if self.draws is None:
            for item in super().__iter__():  # DistributedSampler's shard of a (shuffled) permutation
                yield offset + item
            return
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 65_537 + self.rank)
        remaining = len(self)
        while remaining:
            count = min(_CHUNK, remaining)
            for item in torch.randint(self.size, (count,), generator=generator).tolist():
                yield offset + item
            remaining -= count
