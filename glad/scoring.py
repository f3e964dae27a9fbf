"""Per-pixel log-likelihood under the local mixture, layer aggregation, image score (spec §4).

Sign convention: log-likelihoods are high for normal data; the image score is minus a low
quantile of the summed log-likelihood map, so a high score means anomalous.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from glad.align import object_mask
from glad.local_weights import LocalWeights
from glad.mixture import LOG_2PI, MixtureFactors, iter_costs, logsumexp_

# Floats of whitened features (B x rows x d) materialised at once. CPU: 2 MB, so a chunk and its
# gathered inputs stay near a core's L2 (of 0.5-16 MB chunks, 1-2 MB measured fastest); GPU: few,
# large kernels, and 256 MB bounds a batch of 64 on every layer shape.
CPU_BUDGET = 1 << 19
GPU_BUDGET = 1 << 26
METHODS = ("auto", "sparse", "dense")


def budget_for(device: torch.device) -> int:
    """Floats of intermediate results one chunk may hold on `device`."""
    return CPU_BUDGET if device.type == "cpu" else GPU_BUDGET


def choose_method(method: str, device: torch.device) -> str:
    """Resolve "auto": sparse on the CPU (several times fewer flops, §4.7); dense on a GPU, where a
    few large GEMMs beat many gathers while d is small (§4.6). The GPU choice is not measured yet:
    `bench/bench_scoring.py --device cuda` prints both."""
    if method not in METHODS:
        raise ValueError(f"unknown scoring method {method!r}; use one of {METHODS}")
    if method != "auto":
        return method
    return "sparse" if device.type == "cpu" else "dense"


@torch.no_grad()
def layer_loglik_sparse(
    features: torch.Tensor, factors: MixtureFactors, local: LocalWeights,
    budget: int | None = None,
) -> torch.Tensor:
    """log p(u(x) | x) for features (B, HW, d), summing only the Gaussians active at x (§4.1, §4.6).

    Grouped by Gaussian without a loop over Gaussians: the pairs are cut into padded tiles of one
    Gaussian each (`LocalWeights.tiles`), and each bucket of equal-length tiles is whitened by
    one batched GEMM per chunk of `budget` floats, y = W_k u - b_k ("subtract then multiply",
    §2.6). Each position then gathers its active terms and takes a dense log-sum-exp.
    """
    b, hw, d = features.shape
    device = features.device
    tiles = local.tiles(device)
    budget = budget or budget_for(device)
    half_const = 0.5 * (d * LOG_2PI + factors.logdets).to(device, torch.float32)
    # -b_k enters through a constant column (as in `iter_costs`), so the GEMM yields W_k u - b_k
    # with no separate pass; positions first, so a tile's B x T rows are one contiguous gather.
    by_position = torch.cat([features.transpose(0, 1), features.new_ones(hw, b, 1)], dim=2)
    stacked = torch.cat([factors.whiteners.transpose(1, 2), -factors.offsets[:, None]], dim=1)
    values = torch.empty(tiles.n_slots + 1, b, device=device)
    values[-1] = -math.inf  # the sentinel that pads every position's slot list
    offset = 0
    for bucket in tiles.buckets:
        tile = bucket.tile
        step = max(1, budget // (tile * b * d))
        for start in range(0, len(bucket.components), step):
            comp = bucket.components[start : start + step]
            n = len(comp)
            x = by_position.index_select(0, bucket.positions[start * tile : (start + n) * tile])
            y = torch.bmm(x.view(n, tile * b, d + 1), stacked.index_select(0, comp))
            distance = y.mul_(y).sum(-1).view(n, tile, b)
            bias = bucket.log_weights[start : start + n] - half_const[comp, None]
            torch.add(bias[..., None], distance, alpha=-0.5,
                      out=values[offset : offset + n * tile].view(n, tile, b))
            offset += n * tile
    terms = values.index_select(0, tiles.slots.view(-1)).view(-1, hw, b)
    return logsumexp_(terms, dim=0).t().contiguous()


@torch.no_grad()
def layer_loglik_dense(
    features: torch.Tensor, factors: MixtureFactors, log_weights: torch.Tensor,
    budget: int | None = None,
) -> torch.Tensor:
    """log p(u(x) | x) with all K Gaussians (§4.1, dense fallback of §4.6).

    `log_weights` is (K,) for the global model or (HW, K) local, -inf where a Gaussian is inactive
    (`LocalWeights.dense_log`): one GEMM against all whiteners per chunk of positions (as
    `iter_costs`), then a masked log-sum-exp over K. Chunks hold whole positions of every image,
    so the weights broadcast over the batch instead of being gathered.
    """
    b, hw, d = features.shape
    k = factors.n_components
    device = features.device
    log_weights = log_weights.to(device, torch.float32)
    positions = max(1, (budget or budget_for(device)) // (b * k * d))
    flat = features.transpose(0, 1).reshape(hw * b, d)
    out = torch.empty(hw, b, device=device)
    for start, costs in iter_costs(flat, factors, budget=positions * b * k * d):
        rows = slice(start // b, (start + len(costs)) // b)
        weights = log_weights if log_weights.ndim == 1 else log_weights[rows, None]
        terms = weights - 0.5 * (costs.view(-1, b, k) + d * LOG_2PI)
        out[rows] = logsumexp_(terms, dim=-1)
    return out.t().contiguous()


def layer_costs(features: torch.Tensor, factors: MixtureFactors) -> torch.Tensor:
    """(B, HW, K) float32 costs D_k + logdet_k of features (B, HW, d) against every Gaussian
    (`iter_costs`): computed once, they give the log-likelihood under any weighting of the same
    mixture (`loglik_from_costs`), as model selection needs for each localisation candidate."""
    b, hw, d = features.shape
    out = torch.empty(b * hw, factors.n_components)
    for start, costs in iter_costs(features.reshape(b * hw, d), factors):
        out[start : start + len(costs)] = costs
    return out.view(b, hw, -1)


def loglik_from_costs(costs: torch.Tensor, weights: torch.Tensor | LocalWeights,
                      dim: int) -> torch.Tensor:
    """(B, HW) log p(u(x) | x) from `layer_costs` (B, HW, K) of `dim`-dimensional features
    (§4.1): under global log-weights (K,), or under local weights over each position's active
    Gaussians only, as `layer_loglik_dense` and `layer_loglik_sparse` give it."""
    b, hw, k = costs.shape
    half_const = 0.5 * dim * LOG_2PI
    if not isinstance(weights, LocalWeights):  # image by image: no second (B, HW, K) table
        shifted = weights.to(torch.float32) - half_const
        return torch.stack([logsumexp_(image * -0.5 + shifted, dim=-1) for image in costs])
    flat, slots = weights.pair_layout()
    values = costs.view(b, hw * k).index_select(1, flat).mul_(-0.5)
    values += torch.from_numpy(weights.log_weights) - half_const
    sentinel = values.new_full((b, 1), -math.inf)  # pads every position's slots
    terms = torch.cat([values, sentinel], dim=1).index_select(1, slots.view(-1))
    return logsumexp_(terms.view(b, -1, hw), dim=1)


def combine_layers(logliks: list[torch.Tensor], size: int) -> torch.Tensor:
    """Upsample each layer's (B, h, w) log-likelihood bilinearly to size x size and sum (E8)."""
    total = None
    for loglik in logliks:
        up = F.interpolate(loglik[:, None], size=(size, size), mode="bilinear",
                           align_corners=False)[:, 0]
        total = up if total is None else total + up
    return total


def fill_invalid_cells(loglik: torch.Tensor) -> torch.Tensor:
    """(B, h, w) map whose NaN cells take the largest (most normal) value among their valid
    8-neighbours, ring after ring inwards; a map with no valid cell stays NaN. For heat maps
    (`GladModel.score_features`).

    A coarse layer's cells are invalid when their receptive field reaches out of the registered
    frame (spec §1.3 step 5): on a rotated frame, two rings of 16-px cells, and bilinear
    upsampling spreads each NaN half a cell further. Summed as NaN, they left a third of an
    aligned bottle's heat map at the floor value, defects near its border included. Filled, the
    pixels there show their finer layers' evidence; the most normal neighbour (rather than the
    mean) keeps a coarse anomaly from spreading into them (pixel AUROC / AU-PRO on bottle 96.8 /
    91.1 against 96.5 / 90.3 with the mean, 94.1 / 89.4 left NaN). Image scores still leave
    those pixels out, as the spec says.
    """
    filled = loglik
    while True:
        missing = torch.isnan(filled)
        if not missing.any():
            return filled
        known = torch.where(missing, -math.inf, filled)
        best = F.max_pool2d(known[:, None], 3, stride=1, padding=1)[:, 0]
        reached = missing & torch.isfinite(best)
        if not reached.any():
            return filled
        filled = torch.where(reached, best, filled)


def image_scores(loglik: torch.Tensor, roi: torch.Tensor, quantile: float) -> np.ndarray:
    """s = -Q_q(Lambda over the ROI) per image (§4.5); NaN pixels (invalid) are ignored."""
    masked = torch.where(roi.to(loglik.device), loglik.double(), math.nan)
    values = torch.nanquantile(masked.flatten(1), quantile, dim=1, interpolation="linear")
    return (-values).cpu().numpy()


def heatmaps(loglik: torch.Tensor, roi: torch.Tensor) -> np.ndarray:
    """h = -Lambda inside the ROI; outside, the least anomalous value inside (§4.5)."""
    heat = -loglik
    usable = roi.to(heat.device) & torch.isfinite(heat)
    floor = torch.where(usable, heat, math.inf).flatten(1).min(1).values.view(-1, 1, 1)
    return torch.where(usable, heat, floor).cpu().numpy().astype(np.float32)


def roi_mask(kind: str, size: int) -> torch.Tensor:
    """Region of interest at the input size: "full", or "margin" (textures: drop 1/16 per side)."""
    roi = torch.zeros(size, size, dtype=torch.bool)
    if kind == "full":
        roi[:] = True
    elif kind == "margin":
        margin = size // 16
        roi[margin : size - margin, margin : size - margin] = True
    else:
        raise ValueError(f"unknown ROI {kind!r}; use 'full', 'margin' or a mask image")
    return roi


def build_roi(roi: str | np.ndarray, reference: np.ndarray, size: int) -> torch.Tensor:
    """The ROI at the input size `size`: "full", "margin" (textures), "auto" (the part in the
    reference, spec §4.4), a polygon [(x, y), ...] in reference pixels, or a mask."""
    if isinstance(roi, str) and roi == "auto":
        return torch.from_numpy(object_mask(reference))
    if isinstance(roi, str):
        return roi_mask(roi, size)
    roi = np.asarray(roi)
    if roi.ndim == 2 and roi.shape[1] == 2 and roi.shape != (size, size):  # a polygon
        points = np.round(roi).astype(np.int32)
        roi = cv2.fillPoly(np.zeros((size, size), np.uint8), [points], 1)
    roi = torch.as_tensor(roi > 0)
    if roi.shape != (size, size):
        raise ValueError(f"ROI mask must be {size}x{size}, got {tuple(roi.shape)}")
    return roi
