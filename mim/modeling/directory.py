"""A trained MIM as a directory: ``mim.json`` (how to build it) + ``trained.safetensors`` (what trained).

The directory is what ``MIMChat``, ``mim chat`` and ``mim serve`` load, what
``mim export`` makes from a Lightning checkpoint, and what ``mim convert``
makes from the released TextBind checkpoint. Frozen parts (the vision
encoder, an LLM that did not train) come from their sources, as in training;
reading it never unpickles anything.

The checkpoint readers and the released layout's mapping are imported here too, so the pre-0.2 paths
``mim.export`` and ``mim.convert`` (both aliases of this module) keep every name they had.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mim.modeling.checkpoint_files import is_distributed_checkpoint, read_checkpoint, read_distributed_checkpoint
from mim.modeling.released_checkpoint import (RELEASED_TOKENS, convert_released, is_released_layout, map_released,
                                              read_released)
from synth.atomic import atomic_path, atomic_write_text

CONFIG_FILE = "mim.json"
WEIGHTS_FILE = "trained.safetensors"
LLM_DIR = "llm"  # a merged LLM (mim export --merge_lora true): a plain transformers checkpoint


_MODEL_CLASS: list[type] = []


def register_model_class(cls: type) -> type:
    """Called once by :mod:`mim.modeling.mim_model` for :class:`MIM`: the loaders here build that class
    without importing its module, so ``MIM.from_pretrained`` can use them (no import circle)."""
    _MODEL_CLASS[:] = [cls]
    return cls


def model_class() -> type:
    if not _MODEL_CLASS:  # importing the package ``mim`` imports mim_model, which registers MIM
        raise RuntimeError("MIM is not registered: import mim (or mim.modeling.mim_model) first")
    return _MODEL_CLASS[0]


def source_record(value: Any) -> dict | None:
    """A model source (``tiny``, a hub id or path, a mapping) as mim.json records it."""
    from dataclasses import asdict

    from synth.model_parts import ModelSource

    return None if value is None else asdict(ModelSource.parse(value))


def save_directory(model, directory: str | os.PathLike[str], sdxl: dict | None = None,
                   refiner: dict | None = None, keys: set[str] | None = None) -> Path:
    """Write the model's hyperparameters and its trained weights (or the given ``keys``)."""
    keep = keys if keys is not None else model.trainable_state_keys()
    return _write_directory(model, Path(directory), keep.__contains__, {}, sdxl, refiner)


def _write_directory(model, directory: Path, keep, model_settings: dict[str, Any], sdxl: dict | None,
                     refiner: dict | None, **extra: Any) -> Path:
    """trained.safetensors (the state-dict keys ``keep`` accepts) and mim.json (the hyperparameters,
    with ``model_settings`` over them)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    with model.full_state():
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if keep(k)}
    # tied weights (an LLM whose lm_head is its input embedding, as SmolLM2's) share storage, which
    # safetensors refuses: each name gets a copy of its own, and loading ties them again
    storages: set[int] = set()
    for key, tensor in state.items():
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in storages:
            state[key] = tensor.clone()
        storages.add(pointer)
    with atomic_path(directory / WEIGHTS_FILE) as temporary:
        save_file(state, str(temporary))
    hparams = {k: v for k, v in dict(model.hparams).items() if k != "init_from"}
    config = {"model": {**hparams, **model_settings}, **extra, "weights": sorted(state), "sdxl": sdxl,
              "refiner": refiner}
    atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2))
    return directory


def save_merged_directory(model, directory: str | os.PathLike[str], sdxl: dict | None = None,
                          refiner: dict | None = None) -> Path:
    """Fold the LoRA adapters into the LLM's weights and write a deployable directory: the merged LLM
    as a plain transformers checkpoint under ``llm/`` (with the tokenizer MIM extended; vLLM or
    ``transformers serve`` read it as it is, and 8/4-bit loading quantizes it), and mim.json + the
    other trained weights beside it. A fully fine-tuned LLM is written there as it is."""
    trained = model.trainable_state_keys()
    if not any(key.startswith("llm.") for key in trained):
        raise ValueError("--merge_lora: the LLM did not train in this checkpoint's stage; its source is the LLM, "
                         "export without --merge_lora true")
    directory = Path(directory)
    merged = model.llm.merge_and_unload() if model.hparams.lora is not None else model.llm
    merged.save_pretrained(directory / LLM_DIR, safe_serialization=True)
    model.tokenizer.save_pretrained(directory / LLM_DIR)
    # mim.json last: a directory that has one has its LLM
    return _write_directory(model, directory, lambda k: k in trained and not k.startswith("llm."),
                            {"llm": dict(model.hparams.llm, pretrained=LLM_DIR, preset=None, revision=None,
                                         options={}, quantization=None), "lora": None},
                            sdxl, refiner, llm_in_directory=True)


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a MIM directory: no {CONFIG_FILE} (make one with "
                                "`mim export --ckpt ...` or `mim convert --released ...`)")
    return json.loads(path.read_text())


def check_loaded_settings(settings: dict[str, Any], where: str, trust_remote_code: bool = False,
                          overrides: dict[str, Any] | None = None) -> None:
    """Settings read from a file (mim.json, a checkpoint's hyperparameters) choose no code: its model
    sources may not ask for remote code unless the user said ``trust_remote_code`` (sources the user passes
    as ``overrides`` are theirs), and its head's class path is checked by
    :meth:`heads.GenerationHead.from_hparams` before anything is imported."""
    from synth.model_parts.source import refuse_code_from_file

    if trust_remote_code:
        return
    for part in ("llm", "blip2", "sdxl", "refiner"):
        if part not in (overrides or {}):
            refuse_code_from_file(settings.get(part), f"{where}: {part}")


def load_directory(directory: str | os.PathLike[str], quantization: str | None = None,
                   trust_remote_code: bool = False, **overrides: Any):
    """The MIM stored in ``directory``; ``overrides`` replace saved hyperparameters (e.g. llm source);
    ``quantization`` (8bit / 4bit) loads its LLM through bitsandbytes. The directory's own model sources
    may not ask for remote code unless ``trust_remote_code`` (the caller's decision, never the file's)."""
    from safetensors.torch import load_file

    MIM = model_class()
    config = read_config(directory)
    if not isinstance(config.get("model"), dict):
        raise ValueError(f"{Path(directory) / CONFIG_FILE}: no 'model' settings; not a MIM directory")
    check_loaded_settings({**config["model"], "sdxl": config.get("sdxl"), "refiner": config.get("refiner")},
                          str(Path(directory) / CONFIG_FILE), trust_remote_code, overrides)
    settings = dict(config["model"])
    if config.get("llm_in_directory"):  # a merged LLM travels with the directory
        settings["llm"] = {**settings["llm"], "pretrained": str(Path(directory) / settings["llm"]["pretrained"])}
    if quantization is not None:
        _check_quantizable(config, directory)
        settings["llm"] = {**settings["llm"], "quantization": quantization}
    model = MIM(**{**settings, "lazy": False, **overrides})
    state = load_file(str(Path(directory) / WEIGHTS_FILE))
    try:
        model.load_state_dict(state, strict=False)  # checks unknown keys and shapes
    except (KeyError, ValueError) as error:
        raise type(error)(f"{directory}: {error}") from None
    return model


def _check_quantizable(config: dict[str, Any], directory: str | os.PathLike[str]) -> None:
    """A fully fine-tuned LLM's weights sit in trained.safetensors, which a bitsandbytes LLM cannot take:
    it must be written whole first."""
    if any(key.startswith("llm.") and "lora_" not in key for key in config.get("weights", [])):
        raise ValueError(f"{directory}: this export holds a fine-tuned LLM's weights, which cannot be loaded into "
                         "an 8/4-bit LLM; export it with `mim export --merge_lora true` (it writes the LLM whole under "
                         "llm/, which is then quantized as it loads)")


def load_model(path: str | os.PathLike[str], quantization: str | None = None, trust_remote_code: bool = False,
               **overrides: Any):
    """A MIM from a directory (``mim.json``), a Lightning checkpoint (``.ckpt``) or a sharded checkpoint
    folder (FSDP's ``save_distributed_checkpoint``). What the file records chooses no code: see
    :func:`check_loaded_settings` (``trust_remote_code`` is the caller's opt-in)."""
    import torch

    from mim.modeling.checkpoint_files import UnsafeCheckpointError, is_remote_path

    MIM = model_class()

    if is_remote_path(path):
        raise UnsafeCheckpointError(f"{path}: remote models are not loaded; download it and pass the local path")
    path = Path(path)
    if quantization is not None and not path.is_dir():
        raise ValueError(f"{path}: 8/4-bit loading reads a MIM directory; run `mim export` first")
    if quantization is not None and is_distributed_checkpoint(path):
        raise ValueError(f"{path}: 8/4-bit loading reads a MIM directory; run `mim export` on this folder first")
    if is_distributed_checkpoint(path):
        checkpoint = read_distributed_checkpoint(path)
        check_loaded_settings(checkpoint["hyper_parameters"], str(path), trust_remote_code, overrides)
        model = MIM(**{**checkpoint["hyper_parameters"], "init_from": None, "lazy": False, **overrides})
        model.load_state_dict(checkpoint["state_dict"], strict=False)
        return model
    if path.is_dir():
        return load_directory(path, quantization, trust_remote_code, **overrides)
    if path.suffix == ".ckpt":
        hparams = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("hyper_parameters", {})
        check_loaded_settings(hparams, str(path), trust_remote_code, overrides)
        return MIM.load_from_checkpoint(path, map_location="cpu", weights_only=True,
                                        **{"lazy": False, **overrides})
    raise FileNotFoundError(f"{path}: expected a MIM directory (with {CONFIG_FILE}), a .ckpt file or a sharded "
                            "checkpoint folder")


def export_checkpoint(ckpt: str, out: str, sdxl: dict | None = None, refiner: dict | None = None,
                      merge_lora: bool = False, trust_remote_code: bool = False) -> Path:
    """Lightning checkpoint (file or sharded folder) -> MIM directory (only the trained weights travel;
    with ``merge_lora`` the LLM with its adapters folded in, see :func:`save_merged_directory`)."""
    from mim.modeling.sharing import checkpoint_training_figures, write_model_card

    model = load_model(ckpt, trust_remote_code=trust_remote_code)
    if merge_lora:
        directory = save_merged_directory(model, out, sdxl, refiner)
    else:
        directory = save_directory(model, out, sdxl, refiner, keys=set(read_checkpoint(ckpt)["state_dict"]))
    write_model_card(directory, checkpoint_training_figures(ckpt))
    return directory


def convert(released: str, out: str, llm: dict | str = "meta-llama/Llama-2-7b-chat-hf",
            blip2: dict | str = "Salesforce/blip2-flan-t5-xxl", sdxl: dict | str | None = None,
            refiner: dict | str | None = None, released_tokens: list[str] | None = None) -> int:
    """Convert the released TextBind checkpoint into a MIM directory for ``mim chat`` / ``mim serve``.

    Args:
        released: the released state dict (.pt/.bin read with weights_only=True and memory-mapped,
            or .safetensors).
        out: the MIM directory to write.
        llm: the Llama-2 the release was trained from (its tokenizer and config).
        blip2: the BLIP-2 checkpoint that provides the vision encoder and the Q-Former's config.
        sdxl: the SDXL to draw with, recorded for chat and serve (default SDXL base 1.0).
        refiner: the SDXL refiner to record (the released demo used stabilityai/stable-diffusion-xl-refiner-1.0).
        released_tokens: the tokens appended to Llama-2's vocabulary, in order.
    """
    from heads import LanguageDescriptionHead

    MIM = model_class()

    model = MIM(head=LanguageDescriptionHead(), llm=llm, blip2=blip2, stage="instruction")
    convert_released(read_released(released), model, tuple(released_tokens or RELEASED_TOKENS))
    from mim.modeling.sharing import write_model_card

    save_directory(model, out, sdxl=source_record(sdxl), refiner=source_record(refiner))
    write_model_card(out, {"converted from": f"the released TextBind checkpoint ({Path(released).name})"})
    print(f"converted {released} -> {out}")
    return 0


__all__ = [
    "CONFIG_FILE", "WEIGHTS_FILE", "RELEASED_TOKENS", "check_loaded_settings", "convert", "convert_released",
    "export_checkpoint", "is_distributed_checkpoint", "is_released_layout", "load_directory", "load_model",
    "map_released", "read_checkpoint", "read_config", "read_distributed_checkpoint", "read_released",
    "save_directory", "save_merged_directory", "source_record"
]
