"""Per-pixel log-likelihood under the local mixture, layer aggregation, image score (spec §4).

Sign convention: log-likelihoods are high for normal data; the image score is minus a low
quantile of the summed log-likelihood map, so a high score means anomalous.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from glad.local_weights import LocalWeights
from glad.mixture import LOG_2PI, MixtureFactors, iter_costs


def layer_loglik_sparse(
    features: torch.Tensor, factors: MixtureFactors, local: LocalWeights
) -> torch.Tensor:
    """log p(u(x) | x) for features (B, HW, d), summing only the Gaussians active at x (§4.6).

    Gaussian-grouped: each W_k is applied once per batch to the positions where pi_k(x) > 0, then
    a scatter log-sum-exp per position combines the terms.
    """
    b, hw, d = features.shape
    device = features.device
    gptr, positions, log_w = local.csc(device)
    const = (d * LOG_2PI + factors.logdets).to(torch.float32)
    values = torch.empty(b, len(positions), device=device)
    bounds = gptr.tolist()
    for k in range(factors.n_components):
        start, stop = bounds[k], bounds[k + 1]
        if start == stop:
            continue
        y = features[:, positions[start:stop]] @ factors.whiteners[k].t()
        y -= factors.offsets[k]
        values[:, start:stop] = log_w[start:stop] - 0.5 * (torch.einsum("bnd,bnd->bn", y, y)
                                                            + const[k])
    index = positions.expand(b, -1)
    peak = torch.full((b, hw), -math.inf, device=device).scatter_reduce(1, index, values, "amax")
    terms = torch.exp(values - peak.gather(1, index))
    total = torch.zeros(b, hw, device=device).scatter_add_(1, index, terms)
    return peak + torch.log(total)


def layer_loglik_dense(
    features: torch.Tensor, factors: MixtureFactors, log_weights: torch.Tensor
) -> torch.Tensor:
    """log p(u(x) | x) with all K Gaussians; `log_weights` is (K,) global or (HW, K) local (§4.6)."""
    b, hw, d = features.shape
    flat = features.reshape(b * hw, d)
    out = torch.empty(b * hw, device=features.device)
    log_weights = log_weights.to(features.device, torch.float32)
    for start, costs in iter_costs(flat, factors):
        rows = slice(start, start + len(costs))
        weights = log_weights if log_weights.ndim == 1 else log_weights[torch.arange(
            rows.start, rows.stop, device=features.device) % hw]
        out[rows] = torch.logsumexp(weights - 0.5 * (costs + d * LOG_2PI), dim=1)
    return out.view(b, hw)


def combine_layers(logliks: list[torch.Tensor], size: int) -> torch.Tensor:
    """Upsample each layer's (B, h, w) log-likelihood bilinearly to size x size and sum (E8)."""
    total = None
    for loglik in logliks:
        up = F.interpolate(loglik[:, None], size=(size, size), mode="bilinear",
                           align_corners=False)[:, 0]
        total = up if total is None else total + up
    return total


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
