"""FAISS k-means (what `synth cluster` uses) against scikit-learn's, on a random Gaussian mixture.

Both run Lloyd's algorithm from random initial centroids for the same number
of iterations; inertia (sum of squared distances to the nearest centroid) is
computed the same way for both, so the numbers compare the implementations,
not their defaults. Prints wall time and inertia for each, and their ratios.

    pip install scikit-learn
    python benchmarks/cluster_kmeans.py                 # 200k x 512, K = 256
    python benchmarks/cluster_kmeans.py --k 4096        # the paper's K (scikit-learn takes long here)
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def mixture(n: int, dim: int, components: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(components, dim)).astype(np.float32) * 4
    labels = rng.integers(components, size=n)
    return centres[labels] + rng.normal(size=(n, dim)).astype(np.float32)


def inertia(data: np.ndarray, centroids: np.ndarray) -> float:
    import faiss

    index = faiss.IndexFlatL2(data.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    distances, _ = index.search(data, 1)
    return float(distances.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--components", type=int, default=1000, help="Gaussians in the mixture")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from synth.selection.cluster import kmeans

    data = mixture(args.n, args.dim, args.components, args.seed)
    print(f"data: {args.n} x {args.dim} float32, {args.components}-component mixture; K = {args.k}, "
          f"{args.iterations} iterations, random init, 1 run each")

    start = time.perf_counter()
    faiss_result = kmeans(data, args.k, min_cluster_size=1, niter=args.iterations, seed=args.seed, gpu=False)
    faiss_seconds = time.perf_counter() - start
    faiss_inertia = inertia(data, faiss_result.centroids)
    print(f"faiss   : {faiss_seconds:8.1f} s   inertia {faiss_inertia:.6e}")

    from sklearn.cluster import KMeans

    start = time.perf_counter()
    model = KMeans(n_clusters=args.k, init="random", n_init=1, max_iter=args.iterations, tol=0.0,
                   random_state=args.seed, algorithm="lloyd").fit(data)
    sklearn_seconds = time.perf_counter() - start
    sklearn_inertia = inertia(data, model.cluster_centers_)
    print(f"sklearn : {sklearn_seconds:8.1f} s   inertia {sklearn_inertia:.6e}")
    print(f"ratio   : faiss is {sklearn_seconds / faiss_seconds:.1f}x faster; "
          f"inertia faiss / sklearn = {faiss_inertia / sklearn_inertia:.4f}")


if __name__ == "__main__":
    main()
