"""What PaDiM and MahaAD share: backbone resolution, input checks and batched feature iteration."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from glad.detector import ScoreResult
from glad.errors import DatasetError, NotFittedError


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
