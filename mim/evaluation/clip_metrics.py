"""Image metrics over one CLIP model: CLIP score (torchmetrics), image similarity, diversity, Fréchet distance.

CLIP score and CLIP image-image similarity are torchmetrics' ``CLIPScore``
(100 x cosine, clamped at 0). Diversity is the mean pairwise cosine distance of
CLIP image embeddings. The Fréchet distance is computed over CLIP image
features: it is *not* Inception-FID (which needs InceptionV3 weights; give
them to ``mim evaluate --inception_weights`` for torchmetrics' FID as well),
and with few images its covariance is rank-deficient, so compare it only
between runs with the same number of images.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import torch
from torch import nn


class _TensorFeatures(nn.Module):
    """A CLIP model whose get_*_features return tensors, as torchmetrics expects
    (transformers 5 returns model outputs with the projection in ``pooler_output``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        output = self.model.get_image_features(*args, **kwargs)
        return getattr(output, "pooler_output", output)

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        output = self.model.get_text_features(*args, **kwargs)
        return getattr(output, "pooler_output", output)


def _as_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"))).permute(2, 0, 1)


class ClipMetrics:
    """CLIP-based image metrics around one ``synth.model_parts.ClipBundle``."""

    def __init__(self, clip) -> None:
        self.clip = clip
        self.features = _TensorFeatures(clip.model).eval()

    def _score(self, source: list, target: list) -> float | None:
        from torchmetrics.multimodal.clip_score import CLIPScore

        if not source:
            return None
        metric = CLIPScore(model_name_or_path=lambda: (self.features, self.clip.processor))
        source = [_as_tensor(item) if not isinstance(item, str) else item for item in source]
        target = [_as_tensor(item) if not isinstance(item, str) else item for item in target]
        metric.update(source, target)
        return float(metric.compute())

    def clip_score(self, images: list, texts: list[str]) -> float | None:
        """Mean CLIP score of aligned images and texts (torchmetrics, 100 x cosine clamped at 0)."""
        return self._score(images, texts)

    def image_similarity(self, images: list, references: list) -> float | None:
        """Mean CLIP image-image score of aligned pairs (torchmetrics, 100 x cosine clamped at 0)."""
        return self._score(images, references)

    @torch.no_grad()
    def image_features(self, images: list) -> torch.Tensor:
        """Unit-norm CLIP image embeddings (N, D)."""
        if not images:
            return torch.zeros(0, self.clip.model.config.projection_dim)
        inputs = self.clip.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        device = next(self.clip.model.parameters()).device
        features = self.features.get_image_features(pixel_values=inputs["pixel_values"].to(device))
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()


def pairwise_distance(features: torch.Tensor) -> float | None:
    """Mean cosine distance over all pairs of rows (unit-norm or not); None for fewer than two."""
    features = torch.nn.functional.normalize(features.float(), dim=-1)
    pairs = list(combinations(range(features.shape[0]), 2))
    if not pairs:
        return None
    return float(sum(1 - features[i] @ features[j] for i, j in pairs) / len(pairs))


def frechet_distance(first: torch.Tensor, second: torch.Tensor) -> float | None:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D); None with fewer than 2 each."""
    from scipy import linalg

    if first.shape[0] < 2 or second.shape[0] < 2:
        return None
    a, b = first.double().numpy(), second.double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root, _ = linalg.sqrtm(sigma_a @ sigma_b, disp=False)
    if np.iscomplexobj(root):
        root = root.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a + sigma_b - 2 * root))
