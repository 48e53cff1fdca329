"""Stage 3, cluster: FAISS k-means over the kept image embeddings (sections 3.2, 4.1).

Each cluster is a topic; clusters with fewer than ``min_cluster_size`` images
are outliers and are not sampled from (section 4.1: K = 4096, minimum 32).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Clustering:
    assignments: np.ndarray  # (N,) cluster index of each embedding
    distances: np.ndarray  # (N,) squared distance to its centroid
    centroids: np.ndarray  # (K, D)
    sizes: np.ndarray  # (K,)
    kept: np.ndarray  # (K,) bool: size >= min_cluster_size
    inertia: float  # sum of squared distances: the k-means objective


def faiss_uses_gpu() -> bool:
    """True where the GPU build of FAISS is installed and sees a device."""
    import faiss

    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def kmeans(embeddings: np.ndarray, k: int, min_cluster_size: int, niter: int = 20, seed: int = 0,
           spherical: bool = False, nredo: int = 1, gpu: bool | None = None) -> Clustering:
    """FAISS k-means with a fixed seed; GPU when available unless ``gpu=False``.

    ``nredo`` restarts from other random centroids and keeps the best objective:
    k-means falls into local minima (two topics merged, one split), and each
    restart costs one more full run.
    """
    import faiss

    n, dim = embeddings.shape if embeddings.ndim == 2 else (0, 0)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if n < k:
        raise ValueError(f"cannot make {k} clusters from {n} embeddings; lower cluster.k or ingest more pairs")
    data = np.ascontiguousarray(embeddings, dtype=np.float32)
    gpu = faiss_uses_gpu() if gpu is None else gpu
    # max_points_per_centroid: FAISS subsamples to 256 x K points by default; use all points
    # so that results do not depend on a silent subsample. min_points_per_centroid=1: FAISS prints a
    # C++ warning below 39 points per cluster that no caller can catch; the cluster stage records
    # points_per_cluster in its summary instead.
    model = faiss.Kmeans(dim, k, niter=niter, nredo=nredo, seed=seed, spherical=spherical, gpu=gpu, verbose=False,
                         max_points_per_centroid=max(256, -(-n // k)), min_points_per_centroid=1)
    model.train(data)
    distances, assignments = model.index.search(data, 1)
    assignments = assignments[:, 0].astype(np.int64)
    distances = distances[:, 0].astype(np.float32)
    sizes = np.bincount(assignments, minlength=k)
    return Clustering(assignments, distances, model.centroids.copy(), sizes, sizes >= min_cluster_size,
                      float(distances.sum()))
