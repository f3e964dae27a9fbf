"""Acquisition noise: how far a layer's features move when a frame is re-encoded.

Training images are often lossless files, while the line sees frames that a camera, a video
stream or the pipeline's transport compressed. Where training images barely vary (a black
background, a saturated highlight) K-MLE fits Gaussians far narrower than such a change: on a
real bottle category, a quality-95 JPEG copy of a training image scored at twice the threshold,
and every normal test part re-encoded at quality 90 was flagged (image AUROC 100 -> 67).
`jpeg_noise` measures the features' change under a JPEG round trip on the fitting images
themselves; the fit then keeps every Gaussian at least that wide in every direction
(`glad.mixture.noise_floored`), so a re-encoded normal part scores as the part does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from glad.backbones import Backbone
from glad.features import layer_features
from glad.images import jpeg_round_trip

NOISE_IMAGES = 16  # fitting images the noise is measured on (evenly spaced): one small feature pass


def jpeg_noise(backbone: Backbone, images: Sequence[np.ndarray], features: Sequence[torch.Tensor],
               valid: Sequence[torch.Tensor], among: np.ndarray, quality: int, batch_size: int,
               progress: bool = False) -> list[np.ndarray]:
    """Per layer, the (d, d) second moment E[δ δᵀ] of the feature change δ that a JPEG round
    trip at `quality` causes, over the valid cells of up to `NOISE_IMAGES` of the `images`
    indexed by `among` (the ones the mixtures are fitted on).

    `features` (N, h, w, d) per layer and `valid` (N, h*w) per layer are those of `images`,
    already computed by the fit, so only the re-encoded copies go through the backbone.
    """
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be 1-100, got {quality}")
    picked = among[np.unique(np.linspace(0, len(among) - 1, min(NOISE_IMAGES, len(among)))
                             .round().astype(np.int64))]
    copies = [jpeg_round_trip(images[i], quality) for i in picked]
    changed = layer_features(backbone, copies, batch_size, progress, "acquisition noise")
    noise = []
    for before, after, cells in zip(features, changed, valid, strict=True):
        delta = (after - before[picked]).flatten(1, 2)[cells[picked]].double()
        noise.append((delta.T @ delta / max(len(delta), 1)).numpy())
    return noise
