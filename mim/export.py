"""A trained MIM as a directory: ``mim.json`` (how to build it) + ``trained.safetensors`` (what trained).

The directory is what ``MIMChat``, ``mim chat`` and ``mim serve`` load, what
``mim export`` makes from a Lightning checkpoint, and what ``mim convert``
makes from the released TextBind checkpoint. Frozen parts (the vision
encoder, an LLM that did not train) come from their sources, as in training;
reading it never unpickles anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from synth.atomic import atomic_path, atomic_write_text

CONFIG_FILE = "mim.json"
WEIGHTS_FILE = "trained.safetensors"


def source_record(value: Any) -> dict | None:
    """A model source (``tiny``, a hub id or path, a mapping) as mim.json records it."""
    from dataclasses import asdict

    from synth.zoo import ModelSource

    return None if value is None else asdict(ModelSource.parse(value))


def save_directory(model, directory: str | os.PathLike[str], sdxl: dict | None = None,
                   refiner: dict | None = None, keys: set[str] | None = None) -> Path:
    """Write the model's hyperparameters and its trained weights (or the given ``keys``)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    keep = keys if keys is not None else model.trainable_state_keys()
    with model.full_state():
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k in keep}
    with atomic_path(directory / WEIGHTS_FILE) as temporary:
        save_file(state, str(temporary))
    config = {"model": {k: v for k, v in dict(model.hparams).items() if k != "init_from"},
              "weights": sorted(state), "sdxl": sdxl, "refiner": refiner}
    atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2))
    return directory


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a MIM directory: no {CONFIG_FILE} (make one with "
                                "`mim export --ckpt ...` or `mim convert --released ...`)")
    return json.loads(path.read_text())


def load_directory(directory: str | os.PathLike[str], **overrides: Any):
    """The MIM stored in ``directory``; ``overrides`` replace saved hyperparameters (e.g. llm source)."""
    from safetensors.torch import load_file

    from mim.model import MIM

    config = read_config(directory)
    model = MIM(**{**config["model"], "lazy": False, **overrides})
    state = load_file(str(Path(directory) / WEIGHTS_FILE))
    try:
        model.load_state_dict(state, strict=False)  # checks unknown keys and shapes
    except (KeyError, ValueError) as error:
        raise type(error)(f"{directory}: {error}") from None
    return model


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


def load_model(path: str | os.PathLike[str], **overrides: Any):
    """A MIM from a directory (``mim.json``), a Lightning checkpoint (``.ckpt``) or a sharded checkpoint
    folder (FSDP's ``save_distributed_checkpoint``)."""
    from mim.model import MIM

    path = Path(path)
    if is_distributed_checkpoint(path):
        checkpoint = read_distributed_checkpoint(path)
        model = MIM(**{**checkpoint["hyper_parameters"], "init_from": None, "lazy": False, **overrides})
        model.load_state_dict(checkpoint["state_dict"], strict=False)
        return model
    if path.is_dir():
        return load_directory(path, **overrides)
    if path.suffix == ".ckpt":
        return MIM.load_from_checkpoint(path, map_location="cpu", weights_only=True,
                                        **{"lazy": False, **overrides})
    raise FileNotFoundError(f"{path}: expected a MIM directory (with {CONFIG_FILE}), a .ckpt file or a sharded "
                            "checkpoint folder")


def export_checkpoint(ckpt: str, out: str, sdxl: dict | None = None, refiner: dict | None = None) -> Path:
    """Lightning checkpoint (file or sharded folder) -> MIM directory (only the trained weights travel)."""
    model = load_model(ckpt)
    keys = set(read_checkpoint(ckpt)["state_dict"])
    return save_directory(model, out, sdxl, refiner, keys=keys)
