"""Is a model part wired to its input? One number that tells a blind part from a seeing one.

A part whose weights are (near) zero, or that an initialiser left without signal, gives the same output
for every input; training on top of it learns only the language prior. This caught the tiny BLIP-2
vision tower that had been built with every weight at ~1e-10.
"""

from __future__ import annotations

import torch


def input_share(outputs: torch.Tensor) -> float:
    """The share of ``outputs``' variance (N inputs along dim 0) that comes from which input each row was
    computed for: the per-element variance across the N rows, averaged, over the variance of all
    elements. 0 for a part that ignores its input; near 1 when the input decides everything."""
    if outputs.shape[0] < 2:
        raise ValueError(f"input_share needs outputs for at least two inputs, got {outputs.shape[0]}")
    flat = outputs.detach().float().flatten(1)
    total = flat.var()
    if total == 0:
        return 0.0
    return float(flat.var(0).mean() / total)
