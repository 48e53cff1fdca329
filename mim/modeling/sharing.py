"""Sharing a MIM directory: its model card, and the upload to the Hugging Face Hub.

The MIM directory (``mim.json`` + ``trained.safetensors``) is the unit users share. Its ``README.md`` is a
model card with the Hub's YAML header, written from what the directory itself records (base models,
stage, head, trained weights) and what the caller knows besides (training figures, evaluation results), so
a card never states a figure nobody measured.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from synth.atomic import atomic_write_text

CARD_FILE = "README.md"


def _source(record: dict | None) -> str:
    if not record:
        return "-"
    return f"preset `{record['preset']}`" if record.get("preset") else f"`{record.get('pretrained')}`"


def _hub_id(record: dict | None) -> str | None:
    """A base model's hub id for the card's ``base_model`` field (local paths and presets are not ids)."""
    if not record or record.get("preset") or not record.get("pretrained"):
        return None
    value = str(record["pretrained"])
    return value if value.count("/") == 1 and not os.path.exists(value) and not value.startswith((".", "/")) else None


def _table(values: dict[str, Any]) -> list[str]:
    rows = ["| | |", "|---|---|"]
    for key, value in values.items():
        rows.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    return rows


def model_card(directory: str | os.PathLike[str], training: dict[str, Any] | None = None,
               evaluation: dict[str, Any] | None = None, repo_id: str | None = None) -> str:
    """The card's text for the MIM directory ``directory`` (which must hold ``mim.json``)."""
    path = Path(directory) / "mim.json"  # read here, not through mim.modeling.directory, which imports this
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a MIM directory: no mim.json")
    config = json.loads(path.read_text())
    model = config["model"]
    head = model.get("head", {}).get("class_path", "?")
    bases = [b for b in (_hub_id(model.get("llm")), _hub_id(model.get("blip2"))) if b]
    header = ["---", "library_name: textbind", "tags: [textbind, multimodal, interleaved-generation]"]
    if bases:
        header.append("base_model: [" + ", ".join(bases) + "]")
    header.append("---")
    name = repo_id or Path(directory).resolve().name
    lines = [*header, "", f"# {name}", "",
             "A MIM (TextBind, Li et al. 2023, section 5): BLIP-2 vision encoder and Q-Former, a language model, and "
             f"an image-generation head (`{head}`) that conditions SDXL.", "",
             "## Parts", "",
             f"- language model: {_source(model.get('llm'))}" + (" (written whole under `llm/`)"
                                                                if config.get("llm_in_directory") else ""),
             f"- vision encoder and Q-Former: {_source(model.get('blip2'))}",
             f"- image decoder: {_source(config.get('sdxl'))}" + (f", refiner {_source(config.get('refiner'))}"
                                                                 if config.get("refiner") else ""),
             f"- head: `{head}`",
             f"- stage: `{model.get('stage')}`" + (f", LoRA r={model['lora'].get('r')}" if model.get("lora") else ""),
             f"- trained tensors in `trained.safetensors`: {len(config.get('weights', []))} (frozen parts load "
             "from their sources)", ""]
    if model.get("llm", {}).get("preset") or model.get("blip2", {}).get("preset"):
        lines += ["> Built from tiny random-weight presets: this directory shows the machinery, not a capable "
                  "model.", ""]
    if training:
        lines += ["## Training", "", *_table(training), ""]
    if evaluation:
        lines += ["## Evaluation", "", *_table(evaluation), ""]
    lines += ["## How to load", "", "```python", "from mim import MIM", "",
              f"model = MIM.from_pretrained({str(directory)!r})  # or a local copy of the Hub repository",
              "```", "", "or from the command line: `mim chat DIRECTORY` and `mim serve DIRECTORY`. Loading reads "
              "no pickle and runs no code the directory asks for (`trust_remote_code` is the caller's choice).", ""]
    return "\n".join(lines)


def write_model_card(directory: str | os.PathLike[str], training: dict[str, Any] | None = None,
                     evaluation: dict[str, Any] | None = None, repo_id: str | None = None) -> Path:
    path = Path(directory) / CARD_FILE
    atomic_write_text(path, model_card(directory, training, evaluation, repo_id))
    return path


def checkpoint_training_figures(ckpt: str | os.PathLike[str]) -> dict[str, Any]:
    """What a Lightning checkpoint records of its run (steps, epochs), for the card. Read with
    ``weights_only=True``; a sharded folder's figures are not read."""
    import torch

    path = Path(ckpt)
    if not path.is_file():
        return {}
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    hparams = checkpoint.get("hyper_parameters", {})
    figures: dict[str, Any] = {"global step": checkpoint.get("global_step"), "epoch": checkpoint.get("epoch"),
                               "stage": checkpoint.get("mim_stage"), "learning rate": hparams.get("learning_rate")}
    return {k: v for k, v in figures.items() if v is not None}


def push_directory(directory: str | os.PathLike[str], repo_id: str, private: bool = True, token: str | None = None,
                   commit_message: str = "Upload MIM directory", revision: str | None = None) -> str:
    """Create (if needed) the Hub repository ``repo_id`` and upload the MIM directory to it; returns the
    commit URL. The card is written first if the directory has none."""
    from huggingface_hub import HfApi

    directory = Path(directory)
    if not (directory / "mim.json").is_file():
        raise FileNotFoundError(f"{directory}: not a MIM directory (no mim.json); save it first")
    if not (directory / CARD_FILE).is_file():
        write_model_card(directory, repo_id=repo_id)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(folder_path=str(directory), repo_id=repo_id, repo_type="model",
                             commit_message=commit_message, revision=revision)
    return str(getattr(info, "commit_url", info))


def read_evaluation(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The headline figures of a ``mim evaluate`` report (eval.json) for a card: answer accuracy over all
    types, when-to-draw F1, and the text metrics that are numbers."""
    report = json.loads(Path(path).read_text())
    figures: dict[str, Any] = {}
    answers = (report.get("answers") or {}).get("all")
    if answers:
        figures["answer accuracy (all types)"] = answers["accuracy"]
        figures["answer chance (all types)"] = answers["chance"]
    drawing = report.get("drawing") or {}
    if drawing.get("f1") is not None:
        figures["when to draw: F1"] = drawing["f1"]
    for key, value in (report.get("text") or {}).items():
        if isinstance(value, (int, float)):
            figures[f"text: {key}"] = value
    return figures
