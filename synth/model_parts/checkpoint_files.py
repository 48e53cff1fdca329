"""Read a chosen subset of tensors from a safetensors checkpoint (local or hub).

BLIP-2 checkpoints hold the vision model and Q-Former next to an 11B-parameter
language model we never use. Reading only the keys we need, by explicit
prefix, avoids loading the rest and keeps key handling visible instead of
hiding it behind ``strict=False``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _resolve(pretrained: str, filename: str, revision: str | None) -> Path | None:
    """Path of ``filename`` in a local directory or in the hub cache; None if absent."""
    local = Path(pretrained)
    if local.is_dir():
        candidate = local / filename
        return candidate if candidate.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(pretrained, filename, revision=revision))
    except EntryNotFoundError:
        return None


def read_tensors(pretrained: str, prefixes: Iterable[str], revision: str | None = None) -> dict[str, torch.Tensor]:
    """Every tensor whose key starts with one of ``prefixes``, from only the shards holding them."""
    prefixes = tuple(prefixes)
    from safetensors import safe_open

    index_path = _resolve(pretrained, INDEX_FILE, revision)
    if index_path is not None:
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        shards = sorted({shard for key, shard in weight_map.items() if key.startswith(prefixes)})
    else:
        shards = [SINGLE_FILE]
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        shard_path = _resolve(pretrained, shard, revision)
        if shard_path is None:
            raise FileNotFoundError(
                f"{pretrained!r} has no {shard} (nor {INDEX_FILE}). Only safetensors checkpoints are read, "
                "so no pickle is ever unpickled; convert a pytorch_model.bin checkpoint with "
                "`model.save_pretrained(dir, safe_serialization=True)` first."
            )
        with safe_open(str(shard_path), framework="pt") as handle:
            for key in handle.keys():
                if key.startswith(prefixes):
                    tensors[key] = handle.get_tensor(key)
    if not tensors:
        raise KeyError(f"{pretrained!r} holds no tensor under any of the prefixes {prefixes}")
    return tensors


def strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix``, keyed without it."""
    return {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
