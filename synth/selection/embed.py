"""Stage 2, score and embed: CLIP match score and image embedding for every pair.

The pair list is cut into fixed shards (``shard_size`` pairs, in ingest order);
each shard is computed in batches and written atomically as one ``.npz``
(ids, scores, embeddings). A crash loses at most the shards in progress, and a
rerun computes only the missing shards, so every pair is embedded exactly once.

Several GPUs: start one process per device with ``torchrun`` (for example
``torchrun --nproc-per-node 8 -m synth.cli score --config run.yaml``). Rank r
takes shards r, r + W, r + 2W, ...; shards are independent, so processes only
meet at the end, to wait for each other.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from PIL import Image
from tqdm import tqdm

from synth.atomic import atomic_path
from synth.data.pairs import ImagePair, open_image
from synth.model_parts import ModelSource, build_clip


@dataclass(frozen=True)
class Ranks:
    """This process's place among ``torchrun`` workers (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> "Ranks":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def barrier(self) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        dist.barrier()


class _PairImages(Dataset):
    """Images and captions of pairs; an image that no longer decodes comes back as None, never
    as an exception that would stop the stage (ingest decodes every image, but files can change)."""

    def __init__(self, pairs: list[ImagePair]):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        pair = self.pairs[index]
        try:
            return open_image(pair.image), pair.caption
        except OSError:  # ImageDecodeError, a missing file or a cut tar member
            return None, pair.caption


def shard_path(out_dir: Path, index: int) -> Path:
    return out_dir / f"shard-{index:06d}.npz"


def load_shard(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def embed_pairs(
    pairs: list[ImagePair],
    out_dir: str | os.PathLike[str],
    clip: ModelSource | str | dict = "openai/clip-vit-base-patch16",
    batch_size: int = 256,
    shard_size: int = 8192,
    num_workers: int = 4,
    store_dtype: str = "float16",
    on_batch: Callable[[int], None] | None = None,
    ranks: Ranks | None = None,
) -> list[Path]:
    """Write every missing shard this rank owns; return the paths of all shards.

    ``on_batch(n)`` is called after each batch with the running batch count
    (progress hooks, and tests that interrupt the stage).
    """
    if store_dtype not in ("float16", "float32"):
        raise ValueError(f"store_dtype must be float16 or float32, got {store_dtype!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranks = ranks or Ranks.from_environment()
    shards = [pairs[start:start + shard_size] for start in range(0, len(pairs), shard_size)]
    paths = [shard_path(out_dir, index) for index in range(len(shards))]
    mine = [index for index in range(ranks.rank, len(shards), ranks.world)]
    todo = []
    for index in mine:
        if paths[index].exists():
            stored = load_shard(paths[index])["ids"].tolist()
            expected = [pair.id for pair in shards[index]]
            if stored != expected:
                raise RuntimeError(
                    f"{paths[index]} holds other pairs than ingest now lists for shard {index}; the pair list "
                    "changed since it was written. Rerun with --force (or a new work_dir) to recompute.")
        else:
            todo.append(index)
    if todo:
        bundle = build_clip(clip)
        device = ranks.device()
        bundle.model.to(device)
        dtype = np.float16 if store_dtype == "float16" else np.float32

        def collate(batch):
            images, captions = zip(*batch)
            unreadable = torch.tensor([image is None for image in images])
            # a blank stand-in keeps the batch's shape; its score is set to -inf below
            images = [Image.new("RGB", (8, 8)) if image is None else image for image in images]
            return bundle.prepare(list(images), list(captions)), unreadable

        total_batches = sum(-(-len(shards[i]) // batch_size) for i in todo)
        done_batches = 0
        with tqdm(total=total_batches, desc=f"score+embed (rank {ranks.rank})", unit="batch",
                  disable=ranks.rank != 0) as progress:
            for index in todo:
                loader = DataLoader(_PairImages(shards[index]), batch_size=batch_size, num_workers=num_workers,
                                    collate_fn=collate)
                scores, embeddings, unreadable = [], [], []
                for inputs, failed in loader:
                    inputs = {key: value.to(device) for key, value in inputs.items()}
                    batch_scores, batch_embeddings = bundle.score_and_embed(**inputs)
                    scores.append(batch_scores.float().cpu().masked_fill(failed, float("-inf")).numpy())
                    unreadable.append(failed.numpy())
                    embeddings.append(batch_embeddings.float().cpu().numpy().astype(dtype))
                    done_batches += 1
                    progress.update()
                    if on_batch is not None:
                        on_batch(done_batches)
                with atomic_path(paths[index]) as temporary:
                    with temporary.open("wb") as handle:
                        np.savez(handle, ids=np.array([pair.id for pair in shards[index]]),
                                 scores=np.concatenate(scores), embeddings=np.concatenate(embeddings),
                                 unreadable=np.concatenate(unreadable))
    ranks.barrier()
    return paths


def load_embeddings(shards: list[Path], min_score: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(ids, scores, float32 embeddings) of the pairs scoring at least ``min_score``, and the total count.

    Pairs whose image did not decode in the score stage carry a score of -inf and are never kept.
    """
    ids, scores, embeddings, total = [], [], [], 0
    for path in shards:
        shard = load_shard(path)
        keep = shard["scores"] >= min_score
        total += len(keep)
        ids.append(shard["ids"][keep])
        scores.append(shard["scores"][keep])
        embeddings.append(shard["embeddings"][keep].astype(np.float32))
    if not ids:
        return np.array([], dtype=str), np.zeros(0, np.float32), np.zeros((0, 0), np.float32), 0
    return np.concatenate(ids), np.concatenate(scores), np.concatenate(embeddings), total
