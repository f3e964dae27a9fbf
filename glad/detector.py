"""What every detector in this package (GLAD and the baselines) returns and promises."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass
class ScoreResult:
    """Image anomaly scores (higher = more anomalous) and heat maps at the model's input size."""

    scores: np.ndarray  # float64 (B,); +inf for a frame that could not be aligned
    heatmaps: np.ndarray  # float32 (B, S, S), higher = more anomalous, in the (resized) frame
    status: list[str] = field(default_factory=list)  # per image: "ok" or why it was not scored

    def __len__(self) -> int:
        return len(self.scores)


class Detector(Protocol):
    """Estimator interface shared by GLAD and the baselines, so evaluation treats them alike."""

    def fit(self, images: Sequence[np.ndarray]) -> Detector: ...

    def score(self, images: Sequence[np.ndarray]) -> ScoreResult: ...

    def model_bytes(self) -> int:
        """Bytes of all learned parameters (the paper's model size)."""
        ...
