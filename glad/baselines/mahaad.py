"""MahaAD (Rippel, Mertens, Merhof, ICPR 2020; spec §5.4): a Gaussian per layer of pooled features.

The original uses 9 levels of EfficientNet-B4 at 380x380; here it runs on the same backbone, input
size and 3 layers as GLAD, so comparisons are fair. It has no localisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.linalg import pinvh

from glad.backbones import Backbone, resolve_backbone
from glad.baselines._common import (
    check_fitted,
    check_training_set,
    concat_results,
    tensor_bytes,
)
from glad.detector import ScoreResult
from glad.errors import FeatureError
from glad.features import feature_batches


class MahaAD:
    """Global-average-pooled layer features, one Ledoit-Wolf Gaussian per layer.

    Image score = sum over layers of the Mahalanobis distance to that layer's Gaussian (the
    original's "sum-predictor"). MahaAD cannot localise: each heat map is constant, equal to the
    image score, so pixel metrics of MahaAD are those of its image scores broadcast to pixels.

    `backbone` is a name for `create_backbone` (with `weights` and `device`) or a built
    `Backbone`, which is used as is (its own weights and device) so detectors can share one.

    Learned attributes: `backbone_`, `means_` (per layer, float64 (d,)), `precisions_` (per layer,
    float64 (d, d), pseudo-inverse of the shrunk covariance, as scikit-learn's LedoitWolf).
    """

    def __init__(
        self,
        backbone: str | Backbone = "efficientnet_lite0",
        weights: str | Path = "pretrained",
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        progress: bool = False,
    ):
        self.backbone = backbone
        self.weights = weights
        self.device = device
        self.batch_size = batch_size
        self.progress = progress

    def fit(self, images: Sequence[np.ndarray]) -> MahaAD:
        """Fit one Gaussian per layer on the pooled features of normal images."""
        check_training_set(images, 2, "MahaAD")
        backbone = resolve_backbone(self.backbone, self.weights, device=self.device)
        batches = [
            pool(features)
            for features in feature_batches(
                backbone, images, self.batch_size, self.progress, "MahaAD fit"
            )
        ]
        self.means_, self.precisions_ = [], []
        for layer, vectors in enumerate(zip(*batches, strict=True)):
            vectors = np.concatenate(vectors)
            covariance, _ = ledoit_wolf(vectors)
            if not np.trace(covariance) > 0:
                raise FeatureError(f"layer {layer + 1} pooled features do not vary across images")
            self.means_.append(vectors.mean(axis=0))
            self.precisions_.append(pinvh(covariance))
        self.backbone_ = backbone
        return self

    def score(self, images: Sequence[np.ndarray]) -> ScoreResult:
        """Summed per-layer Mahalanobis distances; heat maps constant at the image score."""
        check_fitted(self, "precisions_")
        size = self.backbone_.spec.input_size
        parts = []
        for features in feature_batches(
            self.backbone_, images, self.batch_size, self.progress, "MahaAD score"
        ):
            scores = sum(
                mahalanobis(vectors, mean, precision)
                for vectors, mean, precision in zip(
                    pool(features), self.means_, self.precisions_, strict=True
                )
            )
            flat = scores.astype(np.float32)[:, None, None]
            parts.append((scores, np.broadcast_to(flat, (len(scores), size, size)).copy()))
        return concat_results(parts, size)

    def model_bytes(self) -> int:
        """Bytes of the learned parameters: per-layer means and precisions (no backbone)."""
        check_fitted(self, "precisions_")
        return tensor_bytes(*self.means_, *self.precisions_)


@torch.inference_mode()
def pool(features: list[torch.Tensor]) -> list[np.ndarray]:
    """Global average pooling of each layer map (B, d, h, w) to float64 vectors (B, d)."""
    return [f.mean(dim=(2, 3)).double().cpu().numpy() for f in features]


def mahalanobis(vectors: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Distances sqrt((x - mu)^T P (x - mu)) of the rows of vectors (B, d), float64 (B,)."""
    delta = vectors - mean
    return np.sqrt(np.maximum(np.einsum("bi,ij,bj->b", delta, precision, delta), 0.0))


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit-Wolf (2004) shrunk covariance of the rows of x (n, d), and the shrinkage.

    With S the 1/n sample covariance, m = tr(S)/d and the normalised Frobenius norm
    |A|^2 = tr(A A^T)/d:  delta^2 = |S - m I|^2,
    beta^2 = min(delta^2, 1/n^2 sum_k |x_k x_k^T - S|^2), shrinkage = beta^2/delta^2 (0 if
    delta^2 = 0), covariance = (1 - shrinkage) S + shrinkage m I. The sum over k uses
    |x_k x_k^T - S|^2 = (|x_k|^4 - 2 x_k^T S x_k + tr(S^2)) / d, which sums to
    (sum_k |x_k|^4 - n tr(S^2)) / d: no (n, d, d) tensor. Same estimate as scikit-learn's
    `LedoitWolf` (without its block splitting).
    """
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    centred = x - x.mean(axis=0)
    sample = centred.T @ centred / n
    m = np.trace(sample) / d
    sample_sq = np.sum(sample * sample)  # tr(S^2), S symmetric
    delta2 = (sample_sq - 2.0 * m * np.trace(sample) + d * m * m) / d
    fourth = np.sum(np.sum(centred * centred, axis=1) ** 2)
    beta2 = min(delta2, (fourth - n * sample_sq) / (n * n * d))
    shrinkage = 0.0 if delta2 == 0 else beta2 / delta2
    covariance = (1.0 - shrinkage) * sample
    covariance[np.diag_indices(d)] += shrinkage * m
    return covariance, float(shrinkage)
