"""What an image's query outputs carry: the picture, or a prompt that is the same for every picture? And do
the queries of one picture say different things?

BLIP-2's contrastive stage scores a caption against its best-matching query, so nothing in it asks the other
queries to differ: a small Q-Former trained that way can give every query nearly the same output, and the LLM
then reads one vector repeated ``Q`` times. The opposite failure comes from training the Q-Former through a
language model: the queries can become a soft prompt, a fixed pattern the LLM learns to read, with the
picture a small change on top. The outputs ``x[n, q]`` (picture ``n``, query ``q``) split, around their mean,
into a part that depends only on the query (the same for every picture), a part that depends only on the
picture (the same for every query) and the rest (which query and which picture); their sums of squares add up.

- ``picture_share``: the share of the spread that changes with the picture (1 minus the query-only part). Low:
  the LLM reads mostly a fixed prompt.
- ``query_share``: of that picture-dependent spread, the share that differs between one picture's queries.
  Near 0: the queries collapsed, every one carries the same view of the picture.
- ``mean_cosine``: the mean cosine similarity between two different queries of one picture.
"""

from __future__ import annotations

import torch


def query_spread(outputs: torch.Tensor) -> dict[str, float]:
    """``outputs``: (pictures, queries, width), e.g. Q-Former query outputs or the image embeddings a MIM
    gives its LLM (``MIM.encode_images``). Needs at least two pictures and two queries."""
    if outputs.dim() != 3 or outputs.shape[0] < 2 or outputs.shape[1] < 2:
        raise ValueError(f"outputs must be (pictures >= 2, queries >= 2, width), got {tuple(outputs.shape)}")
    x = outputs.detach().double()
    unit = torch.nn.functional.normalize(x, dim=-1)
    cosine = unit @ unit.transpose(1, 2)  # (N, Q, Q)
    queries = x.shape[1]
    off_diagonal = (cosine.sum((1, 2)) - cosine.diagonal(dim1=1, dim2=2).sum(-1)) / (queries * (queries - 1))
    centred = x - x.mean((0, 1), keepdim=True)
    by_query = centred.mean(0, keepdim=True)  # the same for every picture
    by_picture = centred.mean(1, keepdim=True)  # the same for every query
    total = float(centred.pow(2).sum())
    query_only = float(by_query.pow(2).sum()) * x.shape[0]
    interaction = float((centred - by_query - by_picture).pow(2).sum())
    picture = total - query_only
    return {"picture_share": picture / total if total > 0 else 0.0,
            "query_share": interaction / picture if picture > 0 else 0.0,
            "mean_cosine": float(off_diagonal.mean())}
