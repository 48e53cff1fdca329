"""Batch rendered samples: padding, positions, and the caption-branch attention mask.

Samples without branches use the ordinary causal path (a 2-D padding mask).
When a batch holds any branch, it gets a 4-D boolean mask (B, 1, L, L) built
by broadcasting three per-token vectors, never a Python loop over L x L:

    segment[t]     0 for the main sequence, k for the k-th branch
    prefix_end[t]  main tokens see main positions < t + 1; branch tokens see
                   main positions < their image's anchor
    valid[t]       False for padding

    allowed[q, k] = valid[k] & k <= q & (
                      (segment[k] == 0 & k < prefix_end[q])        # main context
                    | (segment[k] == segment[q] != 0))             # own branch so far

So a caption sees only the context before its image, and no later token sees
the caption (later tokens see the image itself through the vision path).
"""

from __future__ import annotations

import torch

from datamodules.rendering import IGNORE_INDEX, RenderedSample


def collate(samples: list[RenderedSample], pad_token_id: int) -> dict[str, torch.Tensor | list]:
    """input_ids, labels, position_ids, attention_mask (2-D or 4-D), image references, record ids,
    and the head-token slots of output images: ``output_slots`` (N, 3) rows of (batch row, start,
    count) with their ``output_captions``."""
    lengths = [sample.length for sample in samples]
    batch, width = len(samples), max(lengths)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    segment = torch.zeros((batch, width), dtype=torch.long)
    prefix_end = torch.zeros((batch, width), dtype=torch.long)
    valid = torch.zeros((batch, width), dtype=torch.bool)
    for row, sample in enumerate(samples):
        main = len(sample.input_ids)
        input_ids[row, :main] = torch.tensor(sample.input_ids, dtype=torch.long)
        labels[row, :main] = torch.tensor(sample.labels, dtype=torch.long)
        position_ids[row, :main] = torch.arange(main)
        prefix_end[row, :main] = torch.arange(1, main + 1)
        start = main
        for number, (anchor, ids, branch_labels) in enumerate(sample.branches, start=1):
            end = start + len(ids)
            input_ids[row, start:end] = torch.tensor(ids, dtype=torch.long)
            labels[row, start:end] = torch.tensor(branch_labels, dtype=torch.long)
            position_ids[row, start:end] = torch.arange(anchor, anchor + len(ids))  # continues from the image
            segment[row, start:end] = number
            prefix_end[row, start:end] = anchor
            start = end
        valid[row, :start] = True
        position_ids[row, start:] = torch.arange(width - start) + (position_ids[row, start - 1] + 1 if start else 0)
    if any(sample.branches for sample in samples):
        attention_mask = branch_attention_mask(segment, prefix_end, valid)
    else:
        attention_mask = valid.long()
    slots = [(row, start, count) for row, sample in enumerate(samples) for start, count, _ in sample.outputs]
    return {
        "output_slots": torch.tensor(slots, dtype=torch.long).reshape(-1, 3),
        "output_captions": [caption for sample in samples for _, _, caption in sample.outputs],
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "attention_mask": attention_mask,
        "images": [image for sample in samples for image in sample.images],
        "untargeted": sum(sample.untargeted for sample in samples),
        "record_ids": [sample.record_id for sample in samples],
    }


def branch_attention_mask(segment: torch.Tensor, prefix_end: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) bool mask, True where query q may attend to key k (see the module docstring).

    Written one sample at a time into the preallocated output with in-place and
    broadcast operations: the peak memory is the mask itself, with no (L, L)
    temporaries (branch rows, a few dozen per sample, are handled on their own).
    """
    batch, width = segment.shape
    positions = torch.arange(width)
    allowed = torch.empty((batch, 1, width, width), dtype=torch.bool)
    for row in range(batch):
        out = allowed[row, 0]  # (L, L), written in place
        torch.lt(positions[None, :], prefix_end[row][:, None], out=out)  # main context: k < prefix_end[q]
        out &= (segment[row] == 0)[None, :]
        branch_rows = torch.nonzero(segment[row]).flatten()  # own branch, for branch queries only
        out[branch_rows] |= segment[row][None, :] == segment[row][branch_rows][:, None]
        out.tril_()  # causal: k <= q
        out &= valid[row][None, :]
        # padding queries attend to themselves only, so no softmax row is empty (NaN); their labels are ignored
        padding = torch.nonzero(~valid[row]).flatten()
        out[padding, padding] = True
    return allowed
