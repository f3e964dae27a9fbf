"""What PaDiM and MahaAD share: backbone resolution, input checks and batched feature iteration."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from glad.backbones import Backbone, create_backbone
from glad.detector import ScoreResult
from glad.errors import DatasetError, NotFittedError
from glad.features import iter_features


def resolve_backbone(
    backbone: str | Backbone, weights: str | Path, device: str | torch.device
) -> Backbone:
    """Use a built `Backbone` as is (sharing it across detectors), or build one by name."""
    if isinstance(backbone, Backbone):
        return backbone
    return create_backbone(backbone, weights=weights, device=device)


def check_training_set(images: Sequence[np.ndarray], minimum: int, method: str) -> None:
    """Raise `DatasetError` when there are too few training images for a sample covariance."""
    if len(images) < minimum:
        raise DatasetError(
            f"{method} needs at least {minimum} training images to estimate a covariance, "
            f"got {len(images)}"
        )


def check_fitted(detector: object, attribute: str) -> None:
    """Raise `NotFittedError` unless `fit` has set `attribute` on the detector."""
    if not hasattr(detector, attribute):
        name = type(detector).__name__
        raise NotFittedError(f"this {name} is not fitted yet; call fit(images) first")


def feature_batches(
    backbone: Backbone,
    images: Sequence[np.ndarray],
    batch_size: int,
    progress: bool,
    desc: str,
) -> Iterator[list[torch.Tensor]]:
    """`glad.features.iter_features`, with an optional tqdm bar counted in batches."""
    return tqdm(
        iter_features(backbone, images, batch_size),
        total=math.ceil(len(images) / batch_size),
        desc=desc,
        unit="batch",
        disable=not progress,
    )


def concat_results(parts: list[tuple[np.ndarray, np.ndarray]], size: int) -> ScoreResult:
    """Join per-batch (scores, heatmaps) into one `ScoreResult`; no batches gives an empty one."""
    if not parts:
        return ScoreResult(np.zeros(0), np.zeros((0, size, size), dtype=np.float32))
    scores = np.concatenate([s for s, _ in parts]).astype(np.float64)
    heatmaps = np.concatenate([h for _, h in parts]).astype(np.float32, copy=False)
    return ScoreResult(scores, heatmaps)


def tensor_bytes(*tensors: torch.Tensor | np.ndarray) -> int:
    """Total bytes of the given tensors / arrays."""
    return sum(
        t.nbytes if isinstance(t, np.ndarray) else t.numel() * t.element_size() for t in tensors
    )
