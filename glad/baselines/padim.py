"""PaDiM (Defard et al., 2021; spec §5.3): one Gaussian per feature-grid position.

Differences from the paper, on purpose, so that comparisons with GLAD are fair:

* same backbone and preprocessing as GLAD: images resized to 256x256 and **not** centre-cropped to
  224, so the layer-1 grid is 64x64 (not 56x56);
* raw Mahalanobis distances, never min-max normalised with test-set statistics (that normalisation
  in the popular re-implementation is not causal and cannot run on a stream).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

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

_CHUNK_ELEMENTS = 1 << 24  # float64 covariance entries inverted at once (128 MB)


class PaDiM:
    """Per-position multivariate Gaussians on a random subset of the concatenated layer features.

    Embedding at each layer-1 position: the three layer maps concatenated, the coarser ones
    upsampled by nearest replication, then a fixed-seed random subset of `n_features` channels
    (all of them if there are fewer). Per position: mean and covariance (1/(N-1)) + epsilon*I.
    Score map: Mahalanobis distance, upsampled bilinearly to the input size and smoothed with a
    Gaussian of std `sigma` px (0 = off); image score = maximum of the map.

    `backbone` is a name for `create_backbone` (with `weights` and `device`) or a built
    `Backbone`, which is used as is (its own weights and device) so detectors can share one.

    Learned attributes: `backbone_`, `channels_` (int64 (d,), indices into the concatenated
    channels), `mean_` (float32 (P, d)), `precision_` (float32 (P, d, d)) and `grid_` ((h, w) of
    the layer-1 map, P = h*w).
    """

    def __init__(
        self,
        backbone: str | Backbone = "efficientnet_lite0",
        weights: str | Path = "pretrained",
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        n_features: int = 100,
        epsilon: float = 0.01,
        sigma: float = 4.0,
        seed: int = 0,
        progress: bool = False,
    ):
        self.backbone = backbone
        self.weights = weights
        self.device = device
        self.batch_size = batch_size
        self.n_features = n_features
        self.epsilon = epsilon
        self.sigma = sigma
        self.seed = seed
        self.progress = progress

    @torch.inference_mode()
    def fit(self, images: Sequence[np.ndarray]) -> PaDiM:
        """Fit the per-position Gaussians on normal images, streaming over batches."""
        if self.n_features < 1 or self.epsilon <= 0:
            raise ValueError("n_features must be >= 1 and epsilon > 0")
        check_training_set(images, 2, "PaDiM")
        backbone = resolve_backbone(self.backbone, self.weights, device=self.device)
        channels = select_channels(sum(backbone.spec.channels), self.n_features, self.seed)
        channels = torch.from_numpy(channels).to(backbone.device)
        stats = None
        for features in feature_batches(
            backbone, images, self.batch_size, self.progress, "PaDiM fit"
        ):
            embedding = embed(features, channels, backbone.spec.channels)
            if stats is None:  # the grid and dimension are known once the first batch is out
                grid = tuple(features[0].shape[2:])
                stats = PositionGaussians(grid[0] * grid[1], embedding.shape[2], backbone.device)
            stats.update(embedding)
        self.mean_, self.precision_ = stats.finalize(self.epsilon)
        self.grid_ = grid
        self.channels_ = channels
        self.backbone_ = backbone
        return self

    @torch.inference_mode()
    def score(self, images: Sequence[np.ndarray]) -> ScoreResult:
        """Image scores (max of the map) and smoothed Mahalanobis maps at the input size."""
        check_fitted(self, "precision_")
        size = self.backbone_.spec.input_size
        parts = []
        for features in feature_batches(
            self.backbone_, images, self.batch_size, self.progress, "PaDiM score"
        ):
            embedding = embed(features, self.channels_, self.backbone_.spec.channels)
            distances = mahalanobis(embedding, self.mean_, self.precision_)
            maps = distances.T.reshape(-1, 1, *self.grid_)
            maps = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)
            heatmaps = maps[:, 0].cpu().numpy()
            if self.sigma > 0:
                heatmaps = gaussian_filter(heatmaps, sigma=(0, self.sigma, self.sigma))
            parts.append((heatmaps.max(axis=(1, 2)), heatmaps))
        return concat_results(parts, size)

    def model_bytes(self) -> int:
        """Bytes of the learned parameters: means, precisions and channel indices (no backbone)."""
        check_fitted(self, "precision_")
        return tensor_bytes(self.mean_, self.precision_, self.channels_)


def select_channels(total: int, n_features: int, seed: int) -> np.ndarray:
    """A sorted, fixed-seed random subset of min(n_features, total) channel indices (int64)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total, size=min(n_features, total), replace=False)).astype(np.int64)


def embed(
    features: list[torch.Tensor], channels: torch.Tensor, layer_channels: tuple[int, ...]
) -> torch.Tensor:
    """Selected channels of the concatenated layers on the first layer's grid, as (P, B, d).

    Only the selected channels are upsampled (nearest). `channels` must be sorted so that taking
    them layer by layer keeps their order.
    """
    grid = features[0].shape[2:]
    parts = []
    start = 0
    for feature, width in zip(features, layer_channels, strict=True):
        local = channels[(channels >= start) & (channels < start + width)] - start
        start += width
        if local.numel():
            parts.append(F.interpolate(feature[:, local], size=grid, mode="nearest"))
    embedding = torch.cat(parts, dim=1)  # (B, d, h, w)
    return embedding.flatten(2).permute(2, 0, 1).contiguous()


def mahalanobis(
    embedding: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor
) -> torch.Tensor:
    """Distances sqrt((x - mu)^T P (x - mu)) for embedding (P, B, d): one batched GEMM, (P, B)."""
    delta = embedding - mean[:, None, :]
    squared = (torch.bmm(delta, precision) * delta).sum(dim=2)
    return squared.clamp_min_(0.0).sqrt_()


class PositionGaussians:
    """Running mean and scatter matrix per position, merged batch by batch (Chan et al.).

    Memory is one float32 (P, d, d) scatter, the size of the final model: the embeddings of the
    training set are never held. Each batch is centred on its own mean before its outer products
    are summed, so there is no E[xx^T] - mu mu^T cancellation; the mean is kept in float64.
    """

    def __init__(self, positions: int, dim: int, device: torch.device):
        self.count = 0
        self.mean = torch.zeros(positions, dim, dtype=torch.float64, device=device)
        self.scatter = torch.zeros(positions, dim, dim, dtype=torch.float32, device=device)

    def update(self, embedding: torch.Tensor) -> None:
        """Fold in a batch of embeddings (P, B, d)."""
        batch = embedding.shape[1]
        batch_mean = embedding.double().mean(dim=1)
        delta = batch_mean - self.mean
        total = self.count + batch
        # The between-means term n_a n_b / n * delta delta^T is one extra weighted "sample", so the
        # whole update is a single batched GEMM into the scatter, with no (P, d, d) temporary.
        shift = delta * np.sqrt(self.count * batch / total)
        rows = torch.cat([embedding - batch_mean.float()[:, None], shift.float()[:, None]], dim=1)
        self.scatter.baddbmm_(rows.transpose(1, 2), rows)
        self.mean += delta * (batch / total)
        self.count = total

    def finalize(self, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (float32) and precision (float32) of covariance scatter/(N-1) + epsilon*I.

        Inverts in float64 chunks of positions via Cholesky and writes the precision over the
        scatter buffer, so the peak memory stays one (P, d, d) float32 plus a chunk; the
        accumulator is spent afterwards.
        """
        positions, dim = self.mean.shape
        eye = torch.eye(dim, dtype=torch.float64, device=self.mean.device)
        step = max(1, _CHUNK_ELEMENTS // (dim * dim))
        precision = self.scatter
        for start in range(0, positions, step):
            cov = precision[start : start + step].double() / (self.count - 1) + epsilon * eye
            factor, info = torch.linalg.cholesky_ex(cov)
            if info.any():
                raise FeatureError("PaDiM covariance is not positive definite (features NaN/huge?)")
            precision[start : start + step] = torch.cholesky_inverse(factor).float()
        return self.mean.float(), precision
