"""Reading Lightning checkpoints: one ``.ckpt`` file, or a sharded folder written by
``torch.distributed.checkpoint`` (FSDP). Only tensors come back: ``weights_only`` loads, no optimizer states."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def is_distributed_checkpoint(path: str | os.PathLike[str]) -> bool:
    """A folder written by ``torch.distributed.checkpoint`` (FSDP with ``save_distributed_checkpoint``)."""
    return (Path(path) / ".metadata").is_file()


def read_distributed_checkpoint(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The weights and Lightning's metadata of a sharded checkpoint folder, on one process, without the
    optimizer states (for a fully fine-tuned 7B LLM those are twice the weights)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    reader = FileSystemReader(str(folder))
    metadata = reader.read_metadata().state_dict_metadata
    weights = {key.removeprefix("state_dict."): torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
               for key, entry in metadata.items()
               if key.startswith("state_dict.") and isinstance(entry, TensorStorageMetadata)}
    target = {"state_dict": weights}
    _load_state_dict(target, storage_reader=reader, planner=DefaultLoadPlanner(), no_dist=True)
    extra = torch.load(Path(folder) / "meta.pt", map_location="cpu", weights_only=True)
    return {**extra, "state_dict": target["state_dict"]}


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A Lightning checkpoint as a dict: one file, or a sharded folder (see above)."""
    if is_distributed_checkpoint(path):
        return read_distributed_checkpoint(path)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
