"""What the two MSE heads share: a Q-Former from LLM hidden states to SDXL embeddings (section 5.1).

::

    LLM hidden states (N, T, H) --cross-attention--> Q-Former(77 learned queries)
        -> Linear -> prompt_embeds (N, 77, 2048)
        -> mean over queries -> Linear -> pooled_prompt_embeds (N, 1280)

trained against the SDXL text-encoder embeddings of the output image's caption
(as GILL does). The subclasses differ in their tokens and in which hidden
states the Q-Former reads (:meth:`encoder_states`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from datamodules.rendering import OutputImage
from heads.base import GenerationHead, SDXLCondition, untargeted_image
from heads.sdxl_targets import SDXLTargetCache
from synth.model_parts import ModelSource

LossKind = Literal["mse", "l2", "cosine"]


def regression_loss(kind: str, predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mse: mean squared error; l2: mean Euclidean distance per vector; cosine: mean (1 - cosine)."""
    if kind == "mse":
        return torch.nn.functional.mse_loss(predicted, target)
    if kind == "l2":
        return (predicted - target).norm(dim=-1).mean()
    if kind == "cosine":
        return (1 - torch.nn.functional.cosine_similarity(predicted, target, dim=-1)).mean()
    raise ValueError(f"loss must be mse, l2 or cosine, got {kind!r}")


class SDXLEmbeddingHead(GenerationHead):
    """Base of the heads that predict SDXL's text embeddings from the LLM's hidden states."""

    needs_targets = True

    def __init__(self, target_cache: str = "runs/sdxl_targets", sdxl: ModelSource | None = None,
                 num_queries: int = 77, hidden_size: int = 768, num_layers: int = 4, num_heads: int = 12,
                 loss: LossKind = "mse", loss_weight: float = 1.0, pooled_loss_weight: float = 1.0,
                 trigger_loss_weight: float | None = None, query_init_std: float = 0.02, dropout: float = 0.1,
                 **extra: Any) -> None:
        """
        Args:
            target_cache: directory of the SDXL target cache (computed before training).
            sdxl: the SDXL whose text encoders give targets and dimensions (default SDXL base 1.0).
            num_queries: learned queries = tokens of ``prompt_embeds`` (77, SDXL's text length; GILL: 77).
            hidden_size: the head Q-Former's width (GILL's mapper: 512).
            num_layers: its layers (each with cross-attention to the LLM states; GILL: 4 decoder layers).
            num_heads: its attention heads (GILL: 4).
            loss: ``mse`` (the default: the paper's word, section 5.1, "mean squared error"), ``l2``
                (what GILL computes: the Euclidean norm of each token's error, averaged) or ``cosine``.
            loss_weight: weight of the ``prompt_embeds`` term next to the LLM's cross-entropy (GILL: 1.0).
            pooled_loss_weight: weight of the ``pooled_prompt_embeds`` term (SDXL's pooled embedding;
                GILL targets Stable Diffusion 1.5, which has none).
            trigger_loss_weight: cross-entropy weight of the head's trigger token, as a term of its own
                (GILL: 0.5, its generation pass's cross-entropy scale); None: the trigger is an
                ordinary label in the LLM's loss.
            query_init_std: standard deviation of the learned queries' initialisation (GILL: 1.0,
                ``torch.randn``; BLIP-2's query tokens: 0.02).
            dropout: the Q-Former's dropout (GILL's mapper: 0.0; BLIP-2's Q-Former: 0.1).
        """
        from synth.model_parts.sdxl import DEFAULT_SDXL

        sdxl_source = ModelSource.parse(sdxl if sdxl is not None else DEFAULT_SDXL)
        super().__init__(target_cache=target_cache, sdxl=sdxl_source.__dict__ if sdxl is not None else None,
                         num_queries=num_queries, hidden_size=hidden_size, num_layers=num_layers,
                         num_heads=num_heads, loss=loss, loss_weight=loss_weight,
                         pooled_loss_weight=pooled_loss_weight, trigger_loss_weight=trigger_loss_weight,
                         query_init_std=query_init_std, dropout=dropout, **extra)
        if loss not in ("mse", "l2", "cosine"):
            raise ValueError(f"loss must be mse, l2 or cosine, got {loss!r}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.cache = SDXLTargetCache(target_cache, sdxl_source)
        self.sdxl_source = sdxl_source
        self.num_queries, self.hidden_size = num_queries, hidden_size
        self.num_layers, self.num_heads = num_layers, num_heads
        self.loss_kind, self.loss_weight, self.pooled_loss_weight = loss, loss_weight, pooled_loss_weight
        self.trigger_loss_weight = trigger_loss_weight
        self.query_init_std, self.dropout = query_init_std, dropout

    def bind(self, tokenizer, input_embeddings: torch.Tensor, output_embeddings: torch.Tensor) -> None:
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        from synth.model_parts.sdxl import sdxl_text_dims

        super().bind(tokenizer, input_embeddings, output_embeddings)
        tokens, prompt_dim, pooled_dim = sdxl_text_dims(self.sdxl_source)
        if tokens != self.num_queries:
            raise ValueError(f"num_queries={self.num_queries} but SDXL's prompt_embeds have {tokens} tokens")
        config = Blip2QFormerConfig(hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
                                    num_attention_heads=self.num_heads, intermediate_size=4 * self.hidden_size,
                                    encoder_hidden_size=self.state_width(input_embeddings.shape[1]),
                                    cross_attention_frequency=1,
                                    hidden_dropout_prob=self.dropout, attention_probs_dropout_prob=self.dropout)
        self.qformer = Blip2QFormerModel(config)
        self.queries = nn.Parameter(torch.randn(1, self.num_queries, self.hidden_size) * self.query_init_std)
        self.to_prompt = nn.Linear(self.hidden_size, prompt_dim)
        self.to_pooled = nn.Linear(self.hidden_size, pooled_dim)

    def state_width(self, llm_width: int) -> int:
        """Width of the states the Q-Former cross-attends to (the LLM's, unless a subclass maps them)."""
        return llm_width

    def render_output_image(self, caption: str | None, record_id: str) -> OutputImage:
        """The head's tokens before the image; an image without a caption has no target, so it is
        written as a plain image (counted as ``images_without_target``, never a crash)."""
        if not caption or not caption.strip():
            return untargeted_image(record_id)
        return self.output_image()

    def output_image(self) -> OutputImage:
        raise NotImplementedError

    def predict(self, states: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """LLM states (N, T, H) -> prompt_embeds (N, 77, D) and pooled_prompt_embeds (N, P)."""
        states = states.to(self.queries.dtype)
        queries = self.queries.expand(states.shape[0], -1, -1)
        output = self.qformer(query_embeds=queries, encoder_hidden_states=states,
                              encoder_attention_mask=mask).last_hidden_state  # (N, Q, hidden)
        return self.to_prompt(output), self.to_pooled(output.mean(dim=1))

    def encoder_states(self, hidden: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The hidden states the Q-Former reads for each output image, and their mask."""
        raise NotImplementedError

    # --- training ------------------------------------------------------------------------------

    def prepare_targets(self, captions: list[str]) -> None:
        self.cache.compute([caption for caption in captions if isinstance(caption, str) and caption.strip()])

    def targets(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Targets of the batch's output images; every one has a caption (render_output_image saw to it)."""
        bad = [index for index, caption in enumerate(captions) if not isinstance(caption, str) or not caption]
        if bad:
            raise ValueError(f"output image(s) {bad} of the batch have no caption, so no SDXL target")
        loaded = self.cache.load(captions)
        return {"target_prompt_embeds": loaded["prompt_embeds"],
                "target_pooled_prompt_embeds": loaded["pooled_prompt_embeds"]}

    def loss(self, hidden: torch.Tensor, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        slots = batch.get("output_slots")
        if slots is None or len(slots) == 0:
            return {}
        states, mask = self.encoder_states(hidden, slots.to(hidden.device))
        prompt, pooled = self.predict(states, mask)
        target_prompt = batch["target_prompt_embeds"].to(prompt)
        target_pooled = batch["target_pooled_prompt_embeds"].to(pooled)
        prompt_loss = regression_loss(self.loss_kind, prompt, target_prompt)
        pooled_loss = regression_loss(self.loss_kind, pooled, target_pooled)
        return {f"{self.loss_kind}_prompt": self.loss_weight * prompt_loss,
                f"{self.loss_kind}_pooled": self.pooled_loss_weight * pooled_loss}

    # --- inference -------------------------------------------------------------------------

    @torch.no_grad()
    def condition(self, text: str, hidden: torch.Tensor | None) -> SDXLCondition:
        if hidden is None:
            raise ValueError(f"{type(self).__name__} conditions SDXL on hidden states; none were given")
        length = hidden.shape[0]
        slots = torch.tensor([[0, length - self.trigger_length(), self.trigger_length()]], device=hidden.device)
        states, mask = self.encoder_states(hidden[None], slots)
        prompt, pooled = self.predict(states, mask)
        return SDXLCondition(prompt_embeds=prompt, pooled_prompt_embeds=pooled)

    def trigger_length(self) -> int:
        return 1
