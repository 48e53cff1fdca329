"""Q-Former as the medium (paper section 5.1, first variant).

One special token, ``<img>``, means "an image goes here". When it appears, a
Q-Former reads *all* the LLM hidden states up to and including it and writes
SDXL's ``prompt_embeds`` and ``pooled_prompt_embeds``. Trained with MSE (or
l2/cosine) against the SDXL text embeddings of the image's caption, plus the
LLM's cross-entropy on emitting ``<img>``. The paper found this variant
generalises poorly: embeddings regressed to an average of many plausible images.
"""

from __future__ import annotations

import torch

from datamodules.rendering import OutputImage
from heads.embedding_medium import SDXLEmbeddingHead

IMG = "<img>"


class QFormerMediumHead(SDXLEmbeddingHead):
    """``<img>``; a Q-Former over every previous hidden state predicts SDXL's text embeddings."""

    special_tokens = (IMG,)
    trigger = IMG

    def output_image(self) -> OutputImage:
        return OutputImage(tokens=IMG)

    def encoder_states(self, hidden: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (B, L, H), slots (N, 3) of (row, start, count) -> states (N, L, H), mask (N, L):
        everything up to and including the ``<img>`` token."""
        rows, starts = slots[:, 0], slots[:, 1]
        states = hidden[rows]  # (N, L, H)
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        return states, (positions[None, :] <= starts[:, None]).long()
