"""One feature layer's model: `LayerModel` (what GLAD learned about a layer, and the
log-likelihood map it gives) and `LayerFitter` (its global Gaussian mixture, fitted by K-MLE or
EM on the training vectors, subsampled so that the fit time stays bounded).

Split from `glad.model` so that the estimator reads as the sequence of fit steps; the local
weights are learned later, once the fit has chosen a radius (`glad.selection`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from glad.local_weights import LocalWeights
from glad.mixture import (
    CANDIDATES,
    FULL_PASS_EVERY,
    ComponentStats,
    FitReport,
    GaussianMixture,
    MixtureFactors,
    fit_em,
    fit_kmle,
)
from glad.scoring import choose_method, layer_loglik_dense, layer_loglik_sparse

log = logging.getLogger(__name__)

BASE_FLOOR_SHARE = 0.25  # see _base_statistics
# K-MLE's assignment work per layer in whitening multiply-adds (d^2 per vector and component
# compared), about 25 s on the 2-core development CPU. See kmle_sample_size. EfficientNet-Lite0's
# layers (d <= 112) stay under it at 50 000 vectors; ResNet18's and WideResNet50-2's deep layers
# are subsampled. A tenth of it cost 0.7-4.8 AUROC points on three real categories (layer 3 fitted
# on 7 000 instead of 50 000 vectors), so it only guards against d^2 x N blowing up.
FIT_BUDGET = 1e12
MIN_SAMPLES_PER_COMPONENT = 16  # K-MLE keeps at least this many vectors per starting component


@dataclass
class LayerModel:
    """Everything GLAD learned about one feature layer."""

    mixture: GaussianMixture
    factors: MixtureFactors
    grid: tuple[int, int]
    local: LocalWeights | None  # None: global mixture weights at every position
    report: FitReport | None = None
    # cells (HW,) scored; the others were valid in too few training images (`covered_cells`).
    # None: every cell
    covered: torch.Tensor | None = None

    def loglik(self, features: torch.Tensor, valid: torch.Tensor | None = None,
               method: str = "auto") -> torch.Tensor:
        """(B, HW, d) features -> (B, h, w) log-likelihood map, NaN where `valid` is False and
        at cells the model does not cover.

        `method` picks how local weights are evaluated (§4.6): "sparse" (active pairs only),
        "dense" (all K, masked) or "auto" (`glad.scoring.choose_method`).
        """
        method = choose_method(method, features.device)
        if self.local is None:
            out = layer_loglik_dense(features, self.factors, self.factors.log_weights)
        elif method == "dense":
            out = layer_loglik_dense(features, self.factors, self.local.dense_log(features.device))
        else:
            out = layer_loglik_sparse(features, self.factors, self.local)
        return self.masked(out, valid)

    def masked(self, loglik: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """A (B, HW) log-likelihood as a (B, h, w) map, NaN where `valid` (B, HW) is False and at
        the cells the model does not cover."""
        if valid is not None:
            loglik = loglik.masked_fill(~valid.to(loglik.device), math.nan)
        if self.covered is not None:
            loglik = loglik.masked_fill(~self.covered.to(loglik.device), math.nan)
        return loglik.view(-1, *self.grid)

    def with_noise(self, noise: np.ndarray) -> LayerModel:
        """This layer with no Gaussian narrower than the acquisition noise (d, d) in any
        direction (`glad.acquisition`), its whitening factors made anew."""
        mixture = self.mixture.with_noise(noise)
        return replace(self, mixture=mixture, factors=mixture.factors())

    @property
    def nbytes(self) -> int:
        """Bytes of the scoring parameters: whitening factors and sparse local weights."""
        f = self.factors
        total = sum(t.numel() * t.element_size() for t in
                    (f.whiteners, f.offsets, f.logdets, f.log_weights))
        if self.local is not None:
            total += self.local.indptr.nbytes + self.local.components.nbytes
            total += self.local.log_weights.nbytes
        return total


def kmle_sample_size(available: int, k: int, d: int, max_iter: int, max_samples: int,
                     budget: float = FIT_BUDGET) -> int:
    """How many of a layer's `available` training vectors K-MLE fits on.

    All of them up to `max_samples`, fewer when the expected assignment work would exceed
    `budget` multiply-adds: d^2 per (vector, component) pair, against all K components in a full
    pass every FULL_PASS_EVERY iterations and against CANDIDATES in the others. Deep layers
    (large d) get fewer vectors, so the fit time no longer grows with d^2 x N; never fewer than
    MIN_SAMPLES_PER_COMPONENT per starting component, so K-MLE keeps something to prune from.
    """
    full_passes = 1 + max_iter // FULL_PASS_EVERY
    per_vector = d * d * (k * full_passes + CANDIDATES * max_iter)
    affordable = int(budget // per_vector)
    return min(available, max(min(max_samples, affordable), MIN_SAMPLES_PER_COMPONENT * k))


def _base_statistics(stats: ComponentStats, sample_weight: float) -> ComponentStats:
    """A batch fit's statistics as an online update starts from them: each fitted vector stands
    for `sample_weight` training vectors (K-MLE ran on a subsample), and every component keeps a
    floor of min(1/4 of its count, 2 d) so a rare but legitimate variant is never forgotten (§7.5)."""
    stats = stats.scaled(sample_weight)
    floor = np.minimum(BASE_FLOOR_SHARE * stats.weight, 2.0 * stats.mean.shape[1])
    return replace(stats, floor=floor)


@dataclass(frozen=True)
class LayerFitter:
    """How each layer's global mixture is fitted: `GladModel`'s constructor parameters of the
    same names (`mixture` is "kmle" or "em"; `n_components` a number or "auto")."""

    mixture: str
    n_components: int | str
    max_components: int
    init: str
    max_iter: int
    rel_tol: float
    max_fit_samples: int
    fit_budget: float
    min_images: int
    oas_formula: str
    seed: int
    progress: bool

    def fit(self, features: torch.Tensor, valid: torch.Tensor, index: int) -> LayerModel:
        """Layer `index`'s model (global weights only) from its training features (M, h, w, d)
        and their validity (M, h*w)."""
        started = time.perf_counter()
        mixture, report = self._fit_mixture(features, valid, index)
        log.info("layer %d: K=%d after %d K-MLE iterations (%s), log-likelihood %.4g, %.1f s",
                 index + 1, mixture.n_components, report.iterations, report.stop_reason,
                 report.log_likelihood, time.perf_counter() - started)
        return LayerModel(mixture, mixture.factors(), tuple(features.shape[1:3]), None, report)

    def _fit_mixture(self, features: torch.Tensor, valid: torch.Tensor,
                     layer: int) -> tuple[GaussianMixture, FitReport]:
        m, h, w, d = features.shape
        keep = valid.flatten()
        x = features.reshape(-1, d)[keep]
        image_ids = np.repeat(np.arange(m), h * w)[keep.numpy()]
        k = self.n_components
        if k == "auto":
            k = int(np.clip(m * h * w // (2 * d), 8, self.max_components))
        samples = kmle_sample_size(len(x), int(k), d, self.max_iter, self.max_fit_samples,
                                   self.fit_budget)
        if len(x) > samples:
            rng = np.random.default_rng(self.seed + layer)
            rows = np.sort(rng.choice(len(x), size=samples, replace=False))
            x, image_ids = x[torch.from_numpy(rows)], image_ids[rows]
        common = dict(init=self.init, max_iter=self.max_iter, rel_tol=self.rel_tol,
                      oas_formula=self.oas_formula, seed=self.seed + layer)
        if self.mixture == "kmle":
            with tqdm(total=self.max_iter, desc=f"layer {layer + 1} K-MLE", unit="it",
                      disable=not self.progress) as bar:
                def show(iteration: int, n_components: int, loglik: float) -> None:
                    bar.update(1)
                    bar.set_postfix(K=n_components, ll=f"{loglik / len(x):.4g}/vector")

                mixture, report = fit_kmle(x, image_ids, int(k), min_images=min(self.min_images, m),
                                           on_iteration=show, **common)
            mixture.stats = _base_statistics(mixture.stats, int(keep.sum()) / len(x))
            return mixture, report
        if self.mixture == "em":
            return fit_em(x, image_ids, int(k), **common)
        raise ValueError(f"unknown mixture {self.mixture!r}; use 'kmle' or 'em'")
