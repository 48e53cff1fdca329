"""Building MIM under FSDP2 (Lightning's ``ModelParallelStrategy``) without a whole LLM on any rank.

Every rank builds the LLM on the meta device (shapes, no memory) in the
source's dtype, shards it with ``fully_shard``, allocates only its own shard,
and receives its slice of the checkpoint from rank 0, one decoder layer at a
time: rank 0 reads the safetensors shards key by key, so no process ever holds
the whole LLM (a preset or a GGUF file, small or unreadable in pieces, is
built whole on rank 0 only). The BLIP-2 parts are built whole (the ViT is
frozen and kept in bf16: 2 GB at the paper's size); the parts with random
initial weights (projection, the head's) are taken from rank 0 so that every
rank starts from the same model.

FSDP2 groups: each decoder layer, the input embeddings, the decoder's final
norm, the output embeddings (each is called on its own by MIM.forward, so each
needs its own all-gather), the vision tower (frozen, bf16), and the root
(Q-Former, query tokens, projection, head).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class TokenRows:
    """Rows of an embedding matrix for a few token ids, standing in for the (V, H) matrix a head's
    ``bind`` indexes: only rank 0 ever reads the real matrices."""

    def __init__(self, rows: dict[int, torch.Tensor], shape: tuple[int, int]) -> None:
        self.rows, self.shape = rows, torch.Size(shape)

    def detach(self) -> "TokenRows":
        return self

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        if len(ids) == 0:
            return torch.empty(0, self.shape[1])
        return torch.stack([self.rows[int(i)] for i in ids])


def _new_rows(old: torch.Tensor, count: int, mode: str) -> torch.Tensor:
    """Rows for tokens added to the vocabulary: the mean of the old rows (transformers' default since
    4.46, which adds noise of covariance 1e-9 around it) or N(0, 0.02) (what the release got)."""
    if mode == "mean":
        return old.float().mean(0, keepdim=True).expand(count, -1).to(old.dtype)
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(count, old.shape[1], generator=generator) * 0.02).to(old.dtype)


def _resize(tensor: torch.Tensor, vocab: int, mode: str) -> torch.Tensor:
    if tensor.shape[0] >= vocab:
        return tensor[:vocab]
    return torch.cat([tensor, _new_rows(tensor, vocab - tensor.shape[0], mode)])


def _base_model(llm: nn.Module) -> nn.Module:
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


def _checkpoint_to_model_keys(llm: nn.Module) -> dict[str, str]:
    """Checkpoint key -> this (possibly LoRA-wrapped) LLM's key: peft adds ``base_model.model.`` and
    ``.base_layer`` around the layers it adapts."""
    mapping = {}
    for key in llm.state_dict(keep_vars=True):
        if "lora_" in key:
            continue
        original = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        mapping[original] = key
    return mapping


def _lora_initial_state(llm: nn.Module) -> dict[str, torch.Tensor]:
    """Fresh LoRA weights as peft makes them: A Kaiming-uniform (a = sqrt 5), B zero."""
    state = {}
    for key, value in llm.state_dict(keep_vars=True).items():
        if "lora_A" in key:
            weight = torch.empty(value.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            state[key] = weight.to(value.dtype)
        elif "lora_B" in key:
            state[key] = torch.zeros(value.shape, dtype=value.dtype)
    return state


def _broadcast(value: Any) -> Any:
    import torch.distributed as dist

    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def load_broadcast(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Rank 0's tensors (full) into every rank's shards of ``module``; other ranks pass {}."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state = dict(state)  # set_model_state_dict adds keys to the mapping it is given
    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                  strict=False))


def _reset_rotary(llm: nn.Module, device: torch.device) -> None:
    """Rotary inverse frequencies are non-persistent buffers: recompute them after ``to_empty``."""
    for module in list(llm.modules()):
        for name, child in list(module.named_children()):
            if type(child).__name__.endswith("RotaryEmbedding") and hasattr(child, "config"):
                setattr(module, name, type(child)(config=child.config).to(device))


def _mixed_precision(model: nn.Module):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    precision = str(getattr(getattr(model, "_trainer", None), "precision", "32-true") or "32-true")
    if precision.startswith("bf16"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision.startswith("16"):
        return MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def build_sharded(model, mesh) -> None:
    """Build ``model``'s parts sharded over ``mesh`` (see the module docstring)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from synth.model_parts.llm import LLMCheckpointReader, build_llm_skeleton

    hp = model.hparams
    rank0 = dist.get_rank() == 0
    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" \
        else torch.device(mesh.device_type)
    llm = build_llm_skeleton(model.llm_source, model.tokenizer)
    config = llm.config
    if getattr(config, "tie_word_embeddings", False):
        raise ValueError(f"{model.llm_source}: an LLM whose input and output embeddings are one tensor cannot be "
                         "sharded the way MIM calls them (separately); train it with DDP or DeepSpeed instead")
    vocab, hidden = len(model.tokenizer), config.hidden_size

    # rank 0 reads the embeddings first: the head's token rows come from them
    reader = LLMCheckpointReader(model.llm_source, config.num_hidden_layers) if rank0 else None
    embeddings: dict[str, torch.Tensor] = {}
    rows = None
    if rank0:
        embeddings = {key: _resize(value, vocab, hp.new_token_init) for key, value in reader.embeddings().items()}
        ids = [model.tokenizer.convert_tokens_to_ids(token) for token in model.head.special_tokens]
        rows = tuple({i: embeddings[key][i].float() for i in ids}
                     for key in ("model.embed_tokens.weight", "lm_head.weight"))
    rows = _broadcast(rows)

    model._build_vision(hidden)
    model.head.bind(model.tokenizer, TokenRows(rows[0], (vocab, hidden)), TokenRows(rows[1], (vocab, hidden)))
    model.llm = llm
    model._adapt_llm()  # LoRA (on the skeleton) and activation checkpointing
    random_init = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()
                   if k.startswith(("projection.", "head."))} if rank0 else {}

    policy = _mixed_precision(model)
    base = _base_model(model.llm)
    decoder = base.get_decoder()
    for layer in decoder.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(decoder.embed_tokens, mesh=mesh, mp_policy=policy)
    fully_shard(decoder, mesh=mesh, mp_policy=policy)
    fully_shard(base.get_output_embeddings(), mesh=mesh, mp_policy=policy)
    fully_shard(model.vision_model, mesh=mesh)
    fully_shard(model, mesh=mesh, mp_policy=policy)

    model.llm.to_empty(device=device)
    _reset_rotary(model.llm, device)
    keys = _checkpoint_to_model_keys(model.llm)
    pieces = ([embeddings], reader.pieces()) if rank0 else None
    for piece in _pieces(pieces):  # every rank takes part in every broadcast
        load_broadcast(model.llm, {keys[k]: v for k, v in piece.items() if k in keys})
    load_broadcast(model.llm, _lora_initial_state(model.llm) if rank0 and hp.lora else {})
    load_broadcast(model, random_init)


def _pieces(sources):
    """Rank 0's pieces one after another (read lazily); every other rank gets an empty piece per piece."""
    from itertools import chain

    if sources is None:  # not rank 0: as many empty pieces as rank 0 says there are
        while _broadcast(None):
            yield {}
        return
    for piece in chain(*sources):
        _broadcast(True)
        yield piece
    _broadcast(False)
