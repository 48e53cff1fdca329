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
        return _EpochIterator(self, self.epoch)

    def indices(self, epoch: int) -> Iterator[int]:
        """This rank's indices for ``epoch``: the same seed and epoch give the same sequence."""
        offset = epoch * self.size if self.tag_epochs else 0
        if self.draws is None:
            for item in self._permutation_share(epoch):
                yield offset + item
            return
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 65_537 + self.rank)
        remaining = len(self)
        while remaining:
            count = min(_CHUNK, remaining)
            for item in torch.randint(self.size, (count,), generator=generator).tolist():
                yield offset + item
            remaining -= count

    def _permutation_share(self, epoch: int) -> list[int]:
        """DistributedSampler's shard of the epoch's permutation (padded to divide evenly), for any epoch."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        padding = self.total_size - len(order)
        if padding > 0:
            order += (order * (padding // len(order) + 1))[:padding]
        return order[self.rank:self.total_size:self.num_replicas]


class _EpochIterator:
    """An epoch's indices that remember where they are: torchdata's StatefulDataLoader saves
    ``state_dict()`` in each checkpoint and calls ``load_state_dict`` on resume, which recreates that
    epoch's sequence (whatever epoch the sampler was set to when the loader was rebuilt) and skips
    what was already yielded."""

    def __init__(self, sampler: EpochSampler, epoch: int) -> None:
        self.sampler, self.epoch, self.yielded = sampler, epoch, 0
        self.items = sampler.indices(epoch)

    def __iter__(self) -> "_EpochIterator":
        return self

    def __next__(self) -> int:
        item = next(self.items)
        self.yielded += 1
        return item

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.yielded = int(state["epoch"]), int(state["yielded"])
        if self.yielded >= len(self.sampler):
            # saved after the epoch's last batch: Lightning resumes into the next epoch with this very
            # iterator (it sets the sampler's epoch only after asking for it), so it continues there
            self.epoch, self.yielded = self.epoch + 1, 0
        self.sampler.set_epoch(self.epoch)
        self.items = self.sampler.indices(self.epoch)
        for _ in range(self.yielded):
            next(self.items)
