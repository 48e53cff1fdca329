"""Prompt tokens as the medium (paper section 5.1, second variant, after GILL).

``r`` special tokens ``<IMG1> ... <IMGr>`` (r = 8 by default, as GILL). The LLM
is trained to emit ``<IMG1>`` where an image belongs; the other r - 1 are
forced at inference, giving the LLM r extra steps to "think" about the image.
A Q-Former reads only the hidden states of those r tokens and writes SDXL's
``prompt_embeds`` and ``pooled_prompt_embeds``, trained with MSE (or
l2/cosine) against the caption's SDXL text embeddings. The token embeddings
belong to the head, so they train even when the LLM is frozen.
"""

from __future__ import annotations

import torch
from torch import nn

from datamodules.rendering import OutputImage
from heads.embedding_medium import SDXLEmbeddingHead

MAX_PROMPT_TOKENS = 8  # the tiny tokenizer ships <IMG1>..<IMG8>; real tokenizers get them added


class PromptTokensHead(SDXLEmbeddingHead):
    """``<IMG1>...<IMGr>``; a Q-Former over those r hidden states predicts SDXL's text embeddings."""

    trigger = "<IMG1>"

    def __init__(self, num_tokens: int = 8, input_residual: bool = False, encoder_layers: int = 0,
                 **kwargs) -> None:
        """
        Args:
            num_tokens: r, the number of prompt tokens (GILL: 8).
            input_residual: add the tokens' input embeddings to their hidden states before the mapper
                reads them (GILL's ``gill_mapper``: ``x = x + input_embs``).
            encoder_layers: self-attention layers over the r states before the Q-Former reads them,
                after a projection to ``hidden_size`` (GILL: a 4-layer Transformer encoder at width
                512, pre-norm, no dropout); 0: the Q-Former cross-attends to the LLM states directly.
            **kwargs: the Q-Former and loss options of :class:`~heads.embedding_medium.SDXLEmbeddingHead`.
        """
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be at least 1, got {num_tokens}")
        if encoder_layers < 0:
            raise ValueError(f"encoder_layers must be >= 0, got {encoder_layers}")
        extra = {"input_residual": input_residual} if input_residual else {}
        extra |= {"encoder_layers": encoder_layers} if encoder_layers else {}
        super().__init__(num_tokens=num_tokens, **extra, **kwargs)
        self.num_tokens = num_tokens
        self.input_residual, self.encoder_layers = input_residual, encoder_layers
        # instance attribute: how many tokens depends on the configuration
        self.special_tokens = tuple(f"<IMG{i}>" for i in range(1, num_tokens + 1))

    def bind(self, tokenizer, input_embeddings: torch.Tensor, output_embeddings: torch.Tensor) -> None:
        super().bind(tokenizer, input_embeddings, output_embeddings)
        if self.encoder_layers:
            self.state_proj = nn.Linear(input_embeddings.shape[1], self.hidden_size)
            layer = nn.TransformerEncoderLayer(self.hidden_size, self.num_heads, 4 * self.hidden_size,
                                               dropout=self.dropout, batch_first=True, norm_first=True)
            self.state_encoder = nn.TransformerEncoder(layer, self.encoder_layers, enable_nested_tensor=False)

    def state_width(self, llm_width: int) -> int:
        return self.hidden_size if self.encoder_layers else llm_width

    def output_image(self) -> OutputImage:
        return OutputImage(tokens="".join(self.special_tokens), label_first_only=True)

    def forced_tokens(self) -> list[int]:
        return [self.token_ids[token] for token in self.special_tokens[1:]]

    def trigger_length(self) -> int:
        return self.num_tokens

    def encoder_states(self, hidden: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (B, L, H), slots (N, 3) -> the r prompt-token states (N, r, H or hidden_size), all unmasked."""
        rows, starts = slots[:, 0], slots[:, 1]
        positions = starts[:, None] + torch.arange(self.num_tokens, device=hidden.device)  # (N, r)
        states = hidden[rows[:, None], positions]  # (N, r, H)
        if self.input_residual:
            states = states + self.token_in.to(states.dtype)[None]  # the r tokens' own input rows
        if self.encoder_layers:
            states = self.state_encoder(self.state_proj(states.to(self.state_proj.weight.dtype)))  # (N, r, hidden)
        return states, torch.ones(positions.shape, dtype=torch.long, device=hidden.device)
