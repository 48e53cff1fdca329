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
    model = MIM(**{**config["model"], **overrides})
    state = load_file(str(Path(directory) / WEIGHTS_FILE))
    try:
        model.load_state_dict(state, strict=False)  # checks unknown keys and shapes
    except (KeyError, ValueError) as error:
        raise type(error)(f"{directory}: {error}") from None
    return model


def load_model(path: str | os.PathLike[str], **overrides: Any):
    """A MIM from a directory (``mim.json``) or a Lightning checkpoint (``.ckpt``)."""
    from mim.model import MIM

    path = Path(path)
    if path.is_dir():
        return load_directory(path, **overrides)
    if path.suffix == ".ckpt":
        return MIM.load_from_checkpoint(path, map_location="cpu", weights_only=True, **overrides)
    raise FileNotFoundError(f"{path}: expected a MIM directory (with {CONFIG_FILE}) or a .ckpt file")


def export_checkpoint(ckpt: str, out: str, sdxl: dict | None = None, refiner: dict | None = None) -> Path:
    """Lightning checkpoint -> MIM directory (only the trained weights travel)."""
    model = load_model(ckpt)
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    return save_directory(model, out, sdxl, refiner, keys=set(checkpoint["state_dict"]))
