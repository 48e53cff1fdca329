"""Sampling the next token: shared by the local synthesis backend and MIM's interleaved generation."""

from __future__ import annotations

import torch


def nucleus_sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """A token id from logits (V,): softmax at ``temperature``, then the smallest set of tokens whose mass
    reaches ``top_p``. A temperature of (nearly) 0 or a top_p of (nearly) 0 is greedy."""
    if temperature <= 1e-5 or top_p <= 1e-8:
        return int(logits.argmax())
    probabilities = torch.softmax(logits.float() / temperature, dim=-1)
    ordered, order = probabilities.sort(descending=True)
    keep = ordered.cumsum(0) - ordered < top_p  # always keeps the first
    ordered = ordered * keep
    return int(order[torch.multinomial(ordered / ordered.sum(), 1, generator=generator)])
