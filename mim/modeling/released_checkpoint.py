"""Convert the released TextBind checkpoint into a MIM directory (language-description head).

The release is one state dict::

    query_tokens                 (1, 32, 768)
    qformer.*                    a transformers Blip2QFormerModel
    qformer_projection.*         Linear(768 -> 4096)
    language_model.*             LlamaForCausalLM, vocabulary = Llama-2's 32000 + <image>, <start>, <end>

Every key is mapped explicitly; any key left over, and any trained part of
ours left unfilled, is an error naming it. Embedding rows move by token, not
by index, so our tokenizer's order does not matter; the rows of ``<start>``
and ``<end>`` go to the head, which owns them. The vision encoder is not in
the release: it comes from the BLIP-2 source, as in the released demo.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch

from datamodules.rendering import IMAGE_TOKEN

RELEASED_TOKENS = ("<image>", "<start>", "<end>")
#: The release's state-dict prefixes and ours (``save_modules`` in scripts/run_*_stage.sh).
PREFIXES = {"query_tokens": "query_tokens", "qformer.": "qformer.", "qformer_projection.": "projection.",
            "language_model.": "llm."}
#: Keys in the released file that hold no weight: transformers 4.31's Llama registered its rotary
#: inverse frequencies as a persistent buffer in every layer (from 4.32 on they are not saved), and
#: DeepSpeed's zero_to_fp32 and the release's save_checkpoint kept them. Dropped by name, after a
#: check that they equal this LLM's own (another rope_theta would be a different model).
NON_WEIGHT_KEYS = (re.compile(r"^language_model\.model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),)


def is_released_layout(state: dict) -> bool:
    """Whether a state dict uses the release's key names (``qformer_projection``, ``language_model``)."""
    return any(key.startswith(("qformer_projection.", "language_model.")) for key in state)


def read_released(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The released state dict, from safetensors or a PyTorch file read with ``weights_only=True``.

    PyTorch files are memory-mapped, so converting the 27 GB fp32 release does not need twice its
    size in RAM (files in the pre-1.6 format cannot be mapped and are read whole).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (the released TextBind checkpoint, e.g. "
                                "second_stage_model.pt from huggingface.co/SihengLi/TextBind)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        warnings.warn(f"{path} is in PyTorch's legacy format and cannot be memory-mapped; reading it whole",
                      stacklevel=2)
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if isinstance(state, dict) and all(isinstance(k, str) for k in state) and "module" in state:
        state = state["module"]  # DeepSpeed's layout
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def _drop_non_weights(released: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    kept = {}
    reference = getattr(model.llm.get_decoder(), "rotary_emb", None)
    for key, value in released.items():
        if not any(pattern.match(key) for pattern in NON_WEIGHT_KEYS):
            kept[key] = value
            continue
        ours = getattr(reference, "inv_freq", None)
        if ours is not None and (value.shape != ours.shape or not torch.allclose(value.float(), ours.float().cpu(),
                                                                              rtol=1e-4)):
            raise ValueError(f"{key} in the release differs from this LLM's rotary frequencies (shape "
                             f"{tuple(value.shape)} vs {tuple(ours.shape)}): another rope_theta or head size, so "
                             "another base LLM than the one given with --llm")
    return kept


def map_released(released: dict[str, torch.Tensor], model,
                 released_tokens: tuple[str, ...] = RELEASED_TOKENS) -> dict[str, torch.Tensor]:
    """The released weights under our keys, for ``model`` (a MIM).

    Every key is mapped explicitly and a key with no place is an error. Embedding rows
    move by token, not by index, so our tokenizer's order does not matter; the rows of
    the head's tokens (``<start>``, ``<end>``) go to the head, which owns them. A
    stage-1 file (no ``language_model.*``) maps to the Q-Former, its queries and the projection.
    """
    released = _drop_non_weights(released, model)
    mapped: dict[str, torch.Tensor] = {}
    leftover = []
    for key, value in released.items():
        target = next((PREFIXES[p] + key[len(p):] for p in PREFIXES if key.startswith(p)), None)
        if target is None:
            leftover.append(key)
        else:
            mapped[target] = value
    if leftover:
        raise KeyError(f"released checkpoint has keys with no place in MIM: {leftover[:5]}")
    if not any(key.startswith("llm.") for key in mapped):
        return mapped  # stage 1: query_tokens, qformer.*, qformer_projection.*
    missing_tokens = [t for t in (IMAGE_TOKEN, *model.head.special_tokens) if t not in released_tokens]
    if missing_tokens:
        raise ValueError(f"released_tokens {list(released_tokens)} lack {missing_tokens}")

    tokenizer = model.tokenizer
    embed_key = next((k for k in mapped if k.endswith("embed_tokens.weight")), None)
    head_key = next((k for k in mapped if k.endswith("lm_head.weight")), None)
    if embed_key is None or head_key is None:
        raise KeyError("the released language model lacks model.embed_tokens.weight or lm_head.weight")
    released_in, released_out = mapped.pop(embed_key), mapped.pop(head_key)
    base = released_in.shape[0] - len(released_tokens)

    def released_id(token: str) -> int:
        return base + released_tokens.index(token)

    own = model.state_dict()
    new_in, new_out = own[embed_key].clone(), own[head_key].clone()
    if new_in.shape[1] != released_in.shape[1]:
        raise ValueError(f"the released LLM is {released_in.shape[1]} wide, ours {new_in.shape[1]}: another LLM?")
    new_in[:base], new_out[:base] = released_in[:base], released_out[:base]  # Llama-2's own vocabulary
    for token in released_tokens:
        ours = tokenizer.convert_tokens_to_ids(token)
        new_in[ours], new_out[ours] = released_in[released_id(token)], released_out[released_id(token)]
    mapped[embed_key], mapped[head_key] = new_in, new_out
    head = model.head
    order = list(head.token_ids)
    mapped["head.token_in"] = torch.stack([released_in[released_id(t)] for t in order]).float()
    mapped["head.token_out"] = torch.stack([released_out[released_id(t)] for t in order]).float()
    return mapped


def convert_released(released: dict[str, torch.Tensor], model, released_tokens: tuple[str, ...] = RELEASED_TOKENS
                     ) -> None:
    """Load the released stage-2 weights into ``model`` (a MIM with the language-description head), in place."""
    if not any(key.startswith("language_model.") for key in released):
        found = sorted({key.split(".")[0] for key in released})
        raise ValueError(
            f"this file holds only {found}: the release's stage-1 (alignment) output, without the language model. "
            "Use it as model.init_from for stage 2 (the released recipe), or convert the stage-2 file "
            "(second_stage_model.pt).")
    mapped = map_released(released, model, released_tokens)
    unfilled = sorted(k for k in model.trainable_state_keys() if k not in mapped)
    if unfilled:
        raise KeyError(f"the release does not provide {unfilled[:5]}")
    model.load_state_dict(mapped, strict=True)  # refuses unknown keys and mismatched shapes by name
