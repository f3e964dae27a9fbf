"""Batched feature extraction: RGB images of any size in, per-layer feature tensors out."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from glad.backbones import Backbone
from glad.errors import FeatureError
from glad.images import as_rgb, resize_square


def prepare_batch(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Validate and resize images to one uint8 array (B, size, size, 3)."""
    return np.stack([resize_square(as_rgb(image), size) for image in images])


def iter_features(
    backbone: Backbone, images: Sequence[np.ndarray], batch_size: int = 8
) -> Iterator[list[torch.Tensor]]:
    """Yield per-layer features (B, d, h, w) batch by batch; raise `FeatureError` on NaN/Inf."""
    size = backbone.spec.input_size
    for start in range(0, len(images), batch_size):
        batch = prepare_batch(images[start : start + batch_size], size)
        features = backbone.extract(batch)
        for layer, feature in enumerate(features):
            if not torch.isfinite(feature).all():
                raise FeatureError(
                    f"layer {layer + 1} features of images {start}..{start + len(batch) - 1} "
                    "contain NaN or Inf"
                )
        yield features


def feature_batches(
    backbone: Backbone,
    images: Sequence[np.ndarray],
    batch_size: int,
    progress: bool,
    desc: str,
) -> Iterator[list[torch.Tensor]]:
    """`iter_features` with an optional progress bar counted in batches."""
    return tqdm(
        iter_features(backbone, images, batch_size),
        total=math.ceil(len(images) / batch_size),
        desc=desc,
        unit="batch",
        disable=not progress,
    )


def layer_features(backbone: Backbone, images: Sequence[np.ndarray], batch_size: int,
                   progress: bool, desc: str) -> list[torch.Tensor]:
    """Per layer, the features (N, h, w, d) of all `images`, float32 on the CPU (channels last,
    as the mixtures take them); `desc` names the step on the progress bar."""
    per_batch = [[f.permute(0, 2, 3, 1).cpu() for f in batch]
                 for batch in feature_batches(backbone, images, batch_size, progress, desc)]
    return [torch.cat([b[i] for b in per_batch]) for i in range(len(per_batch[0]))]


def layer_validity(valid: np.ndarray, grids: Sequence[tuple[int, int]], erosion: int = 1,
                   ) -> list[torch.Tensor]:
    """Per-layer validity (B, h*w) from pixel validity (B, S, S) (spec §1.3 step 5, §6.4).

    A cell is valid when every pixel of its stride x stride block is, and stays valid after
    eroding the invalid region by `erosion` cells (receptive fields reaching out of the frame).
    """
    invalid = torch.from_numpy(~np.asarray(valid, dtype=bool)).float()[:, None]
    out = []
    for h, w in grids:
        stride = invalid.shape[-1] // w
        cells = F.max_pool2d(invalid, stride, stride)
        if erosion:
            cells = F.max_pool2d(cells, 2 * erosion + 1, 1, erosion)
        out.append((cells[:, 0] == 0).reshape(len(cells), h * w))
    return out


def covered_cells(valid: Sequence[torch.Tensor], min_images: int) -> list[torch.Tensor]:
    """Per layer, the cells (h*w,) valid in at least `min_images` of the images whose validity
    (M, h*w) is given (all of them when fewer): the cells a model has learned something of.

    On registered images a cell at the border is covered by the frame only when the part sat
    far enough the other way; where that happened in one or two training images, nothing was
    learned of it, and a normal frame covering it scored as an anomaly (on the synthetic
    camera, while a stricter border rule left its bottom corners valid in 1 to 3 of 40 training
    frames, 14 of its 16 false alarms sat there). Scoring leaves such cells out as it does
    invalid ones (`LayerModel.covered`).
    """
    return [v.sum(0) >= min(min_images, len(v)) for v in valid]
