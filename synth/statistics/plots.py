"""PNG plots of the dataset statistics (matplotlib, no display needed)."""

from __future__ import annotations

import os
from pathlib import Path


def _axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=100)
    return plt, figure, axes


def plot_image_positions(positions: dict[str, list[int]], path: str | os.PathLike[str]) -> Path:
    """Figure 4 of the paper: images per turn position, instructions beside responses."""
    plt, figure, axes = _axes()
    turns = range(1, len(positions["instruction"]) + 1)
    axes.bar([t - 0.2 for t in turns], positions["instruction"], width=0.4, label="instructions")
    axes.bar([t + 0.2 for t in turns], positions["response"], width=0.4, label="responses")
    axes.set_xlabel("turn")
    axes.set_ylabel("# images")
    axes.set_title("Image positions by turn")
    axes.set_xticks(list(turns))
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return Path(path)


def plot_counts(counts: dict, title: str, xlabel: str, path: str | os.PathLike[str]) -> Path:
    plt, figure, axes = _axes()
    labels = [str(key) for key in counts]
    axes.bar(labels, list(counts.values()))
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("count")
    axes.tick_params(axis="x", rotation=30)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return Path(path)
