"""The interface every image-generation head implements (paper section 5.1).

A head answers these questions, and nothing else in the library knows which
head is configured:

1. which special tokens it needs (``special_tokens``), and their embeddings;
2. how an output image is written into a training sequence
   (``render_output_image``, asked by the datamodule);
3. which extra targets a batch needs (``targets``; ``prepare_targets`` computes
   them once before training: SDXL embeddings for the MSE heads);
4. its loss terms beyond the LLM's cross-entropy (``loss``);
5. at inference, how LLM output becomes an SDXL condition (``condition``).

A head owns the input and output embedding rows of its special tokens
(``token_in``, ``token_out``, initialised from the LLM's rows): they train
with the head, whether the LLM trains fully, through LoRA, or not at all.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from datamodules.rendering import OutputImage


_UNTARGETED_WARNINGS = 10  # records named in warnings about caption-less output images; the rest are counted


def untargeted_image(record_id: str) -> OutputImage:
    """An assistant image without a caption: no generation target can be made, so it is kept as a plain
    image in the context (later tokens still see it) and counted; every head treats it alike."""
    global _UNTARGETED_WARNINGS
    if _UNTARGETED_WARNINGS > 0:
        _UNTARGETED_WARNINGS -= 1
        warnings.warn(f"record {record_id!r}: an assistant image has no caption, so no head can learn to draw it; "
                      "it stays in the context as an image (counted as train/images_without_target)", stacklevel=3)
    return OutputImage(untargeted=True)


@dataclass
class SDXLCondition:
    """What SDXL is conditioned on: a text prompt (its own text encoders run), or
    ready embeddings (``prompt_embeds`` (1, 77, 2048) and ``pooled_prompt_embeds``
    (1, 1280) for SDXL base)."""

    prompt: str | None = None
    prompt_embeds: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.prompt_embeds is None):
            raise ValueError("an SDXL condition is either a prompt or prompt embeddings, not both or neither")
        if (self.prompt_embeds is None) != (self.pooled_prompt_embeds is None):
            raise ValueError("prompt_embeds and pooled_prompt_embeds come together")

    def pipeline_kwargs(self) -> dict[str, Any]:
        if self.prompt is not None:
            return {"prompt": self.prompt}
        return {"prompt_embeds": self.prompt_embeds, "pooled_prompt_embeds": self.pooled_prompt_embeds}


class GenerationHead(nn.Module, ABC):
    """Base class of the image-generation heads; subclass it and pick it by ``class_path``."""

    special_tokens: ClassVar[tuple[str, ...]] = ()
    #: The token that, generated, starts an output image.
    trigger: ClassVar[str] = ""
    #: Whether ``targets`` needs ``prepare_targets`` over the data's captions before training.
    needs_targets: ClassVar[bool] = False
    #: Cross-entropy weight of the trigger token as a separate term; None: an ordinary label.
    trigger_loss_weight: float | None = None

    def __init__(self, **init_args: Any) -> None:
        super().__init__()
        self._init_args = dict(init_args)
        self.token_ids: dict[str, int] = {}

    def bind(self, tokenizer, input_embeddings: torch.Tensor, output_embeddings: torch.Tensor) -> None:
        """Called by the model once the tokenizer holds ``special_tokens``, with the LLM's
        embedding matrices (V, H); subclasses build LLM-sized parts here."""
        missing = [t for t in self.special_tokens
                   if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
        if missing:
            raise ValueError(f"{type(self).__name__}: tokenizer lacks {missing}; add the head's special tokens first")
        self.token_ids = {token: tokenizer.convert_tokens_to_ids(token) for token in self.special_tokens}
        ids = torch.tensor(list(self.token_ids.values()), dtype=torch.long)
        self.register_buffer("special_ids", ids, persistent=False)
        self.token_in = nn.Parameter(input_embeddings.detach()[ids].clone().float())  # (n, H)
        self.token_out = nn.Parameter(output_embeddings.detach()[ids].clone().float())  # (n, H)

    # --- the head's tokens inside the LLM ------------------------------------------------

    def embed_tokens(self, input_ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, L, H) with the head's own rows at its tokens."""
        if not self.special_tokens:
            return embeds
        match = input_ids[..., None] == self.special_ids  # (B, L, n)
        own = match.to(embeds.dtype) @ self.token_in.to(embeds.dtype)  # (B, L, H)
        return torch.where(match.any(-1, keepdim=True), own, embeds)

    def adjust_logits(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Logits (B, L, V) with the head's tokens scored by its own output rows."""
        if not self.special_tokens:
            return logits
        own = hidden @ self.token_out.to(hidden.dtype).T  # (B, L, n)
        return logits.index_copy(-1, self.special_ids, own.to(logits.dtype))

    # --- training ------------------------------------------------------------------------------

    @abstractmethod
    def render_output_image(self, caption: str | None, record_id: str) -> OutputImage:
        """How an image the assistant shows is written into the training sequence."""

    def prepare_targets(self, captions: list[str]) -> None:
        """Compute whatever ``targets`` will need for these captions (once, before training)."""

    def targets(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Extra per-image training targets for a batch's output-image captions."""
        return {}

    def loss(self, hidden: torch.Tensor, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Loss terms beyond the LLM's cross-entropy, by name (summed into the training loss).

        ``hidden``: the LLM's last hidden states (B, L, H); ``batch["output_slots"]``
        locates the head's tokens of each output image.
        """
        return {}

    # --- inference -------------------------------------------------------------------------

    def forced_tokens(self) -> list[int]:
        """Tokens that follow the trigger without being sampled (prompt-token head)."""
        return []

    @abstractmethod
    def condition(self, text: str, hidden: torch.Tensor | None) -> SDXLCondition:
        """An SDXL condition from what the LLM generated for an image: its text, and
        the last hidden states (T, H) of the context up to the head's last token."""

    # --- checkpoints ---------------------------------------------------------------------------

    def hparams(self) -> dict[str, Any]:
        """class_path and init_args: how a checkpoint records (and rebuilds) this head."""
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": dict(self._init_args)}

    @staticmethod
    def from_hparams(hparams: dict[str, Any]) -> "GenerationHead":
        """The head a checkpoint or a MIM directory records. Its ``class_path`` comes from a file, so it is
        checked before anything is imported: see :func:`head_class`."""
        if not isinstance(hparams, dict) or not isinstance(hparams.get("class_path"), str):
            raise TypeError(f"a head is recorded as {{class_path: ..., init_args: {{...}}}}, got {hparams!r}")
        init_args = hparams.get("init_args") or {}
        if not isinstance(init_args, dict):
            raise TypeError(f"head init_args must be a mapping, got {type(init_args).__name__}")
        return head_class(hparams["class_path"])(**init_args)


#: Environment variable naming more modules (comma-separated) whose heads a loaded file may name.
TRUSTED_HEAD_MODULES_ENV = "TEXTBIND_TRUSTED_HEAD_MODULES"


def head_class(class_path: str) -> type[GenerationHead]:
    """The :class:`GenerationHead` subclass ``class_path`` names, imported only from a module that may be:
    this package (``heads``), a module the running program has already imported (a researcher's own head,
    imported by their code, runs no new code when resolved), or one listed in the environment variable
    ``TEXTBIND_TRUSTED_HEAD_MODULES``. A file can therefore never make the loader import a module."""
    import importlib
    import os
    import sys

    module_name, _, class_name = class_path.rpartition(".")
    trusted = [name.strip() for name in os.environ.get(TRUSTED_HEAD_MODULES_ENV, "").split(",") if name.strip()]
    allowed = (module_name == "heads" or module_name.startswith("heads.") or module_name in sys.modules
               or any(module_name == name or module_name.startswith(name + ".") for name in trusted))
    if not module_name or not class_name.isidentifier() or not allowed:
        raise TypeError(f"head class_path {class_path!r}: heads load from the heads package or from a module "
                        f"your program has imported; import it first, or list it in {TRUSTED_HEAD_MODULES_ENV}")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, GenerationHead)):
        raise TypeError(f"{class_path} is not a GenerationHead")
    return cls
