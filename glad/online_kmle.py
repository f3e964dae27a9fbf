"""Online K-MLE (spec §7): a fitted GLAD model learns from confirmed-normal images without refitting.

Per layer, each update assigns the new vectors with the frozen current mixture, decays the
sufficient statistics (half-life in images), merges the batch's statistics in (Chan et al.),
refreshes OAS covariances of the touched components, and decays and adds local counts pooled over
the model's localisation radius. Vectors the global mixture finds too unlikely are a new
appearance: they wait in a novelty buffer and become new Gaussians only once at least three
distinct images show them. A bounded replay reservoir of recent images lets `consolidate` redo
their hard assignments with the current parameters (K-MLE iterations, warm-started).

This module is plain math on `GladModel`s: no Redis. `online.updater` is the service around it.
One layer's state and the update rules on it alone are `glad.online_layer`'s.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from glad.errors import GladError, ModelFileError
from glad.features import layer_validity
from glad.layer_fit import LayerModel
from glad.local_weights import LocalWeights, neighbourhood, weights_from_counts
from glad.mixture import (
    ComponentStats,
    GaussianMixture,
    MixtureFactors,
    cholesky_with_jitter,
    factors_from_cholesky,
    route,
)
from glad.model import GladModel
from glad.online_layer import LayerState, OnlineConfig, assign_locally, decay, pooled_counts

# OnlineConfig is defined beside the per-layer rules it configures, and read from here as before.
__all__ = ["MAX_TYPICAL_COST", "LearnReport", "OnlineConfig", "OnlineGlad", "UnsoundUpdateError",
           "layer_problems"]

# A Gaussian's whitener W bounds the cost D = |W (u - mu)|^2 of a vector u at the layer's typical
# distance (|u - mu|^2 ~ the pooled trace) by |W|_F^2 x that trace. Costs are float32 (at most
# 3.4e38): past it they overflow to inf, log-likelihoods to -inf, and image scores to NaN (the
# quantile interpolates -inf - -inf; bilinear upsampling multiplies -inf by 0). This bound leaves
# room for vectors 1e4 typical distances away; fitted models sit below 1e12.
MAX_TYPICAL_COST = 1e30


class UnsoundUpdateError(GladError):
    """An online update that would leave unsound parameters (spec §7.6 step 1). The model is
    left as it was before the update."""


@dataclass
class LearnReport:
    """What one update did, per layer."""

    images: int
    known: list[int] = field(default_factory=list)  # vectors folded into existing Gaussians
    novel: list[int] = field(default_factory=list)  # vectors put in the novelty buffer
    spawned: list[int] = field(default_factory=list)  # new Gaussians
    pruned: list[int] = field(default_factory=list)
    touched: list[int] = field(default_factory=list)  # Gaussians whose covariance was refreshed


@dataclass
class _Replay:
    """One learned image, as `consolidate` needs it: its vectors, where they went, and when."""

    step: int
    features: list[torch.Tensor]  # per layer (HW, d) float16, valid known rows only
    positions: list[torch.Tensor]  # per layer (n,) int64
    labels: list[torch.Tensor]  # per layer global labels
    local_labels: list[torch.Tensor]  # per layer local labels (-1 without local weights)

    def copy(self) -> _Replay:
        """A copy whose labels consolidation may replace without touching this one's."""
        return replace(self, labels=list(self.labels), local_labels=list(self.local_labels))


class OnlineGlad:
    """Online K-MLE updates of a fitted, updatable `GladModel` (one whose file has statistics).

    `learn` folds a batch of confirmed-normal images in; `model()` is the updated model as a new
    `GladModel` (the production model is never changed in place); `consolidate` replays recent
    images. Images are counted in `steps_`, which drives forgetting and the buffer's age limit.
    Each update is all or nothing: one that fails, or would leave parameters `layer_problems`
    finds unsound, raises and leaves the model as it was.
    """

    def __init__(self, model: GladModel, config: OnlineConfig | None = None):
        self.config = config or OnlineConfig()
        self.base_ = model
        thresholds = model.online_.get("novelty_loglik") if hasattr(model, "online_") else None
        if not thresholds or any(layer.mixture.stats is None for layer in model.layers_):
            raise ModelFileError("this model has no sufficient statistics, so it cannot learn "
                                 "online; refit it with this version of glad fit")
        self.steps_ = int(model.online_.get("steps", 0))
        self.layers_ = list(model.layers_)  # the current parameters, one LayerModel per layer
        self.states_ = [LayerState.of(layer, t) for layer, t in zip(model.layers_, thresholds,
                                                                   strict=True)]
        self.reservoir_: deque[_Replay] = deque(maxlen=self.config.reservoir_images)
        self._offsets = neighbourhood(model.radius_, model.neighbourhood) if model.radius_ else None

    # --- learning -------------------------------------------------------------------------------

    @contextmanager
    def _all_or_nothing(self) -> Iterator[None]:
        """Run one update on copies of the state kept aside, checking its parameters at the end;
        on any failure the copies come back. A half-applied update (one layer refreshed, the next
        not) would otherwise be what the next update learns from."""
        saved = (self.steps_, list(self.layers_), [s.copy() for s in self.states_],
                 [r.copy() for r in self.reservoir_])
        try:
            yield
            problems = [f"layer {i + 1}: {p}" for i, layer in enumerate(self.layers_)
                        for p in layer_problems(layer)]
            if problems:
                raise UnsoundUpdateError("the update would leave unsound parameters: "
                                         + "; ".join(problems))
        except BaseException:
            self.steps_, self.layers_, self.states_ = saved[0], saved[1], saved[2]
            self.reservoir_ = deque(saved[3], maxlen=self.config.reservoir_images)
            raise

    def learn(self, features: list[torch.Tensor], valid: np.ndarray) -> LearnReport:
        """Fold in B confirmed-normal registered images: backbone features (B, d, h, w) per layer
        and their pixel validity (B, S, S) (False where alignment left no image). Raises
        `UnsoundUpdateError` (the model unchanged) when the result would be unsound."""
        with self._all_or_nothing():
            return self._learn(features, valid)

    def _learn(self, features: list[torch.Tensor], valid: np.ndarray) -> LearnReport:
        batch = len(valid)
        steps = torch.arange(self.steps_, self.steps_ + batch)
        self.steps_ += batch
        report = LearnReport(images=batch)
        grids = [tuple(f.shape[2:]) for f in features]
        replays = [_Replay(self.steps_, [], [], [], []) for _ in steps]
        for index, (f, v) in enumerate(zip(features, layer_validity(valid, grids), strict=True)):
            self._learn_layer(index, f, v, steps, report, replays)
        self.reservoir_.extend(replays)
        return report

    def _learn_layer(self, index: int, features: torch.Tensor, valid: torch.Tensor,
                     steps: torch.Tensor, report: LearnReport, replays: list[_Replay]) -> None:
        state, layer = self.states_[index], self.layers_[index]
        b, d = features.shape[:2]
        hw = features.shape[2] * features.shape[3]
        x = features.flatten(2).transpose(1, 2).reshape(-1, d).float().cpu()
        ok = valid.reshape(-1).cpu()
        image = steps.repeat_interleave(hw)
        position = torch.arange(hw).repeat(b)
        x, image, position = x[ok], image[ok], position[ok]
        labels, loglik, cand_index, cand_cost = route(x, layer.factors, self.config.n_candidates)
        novel = loglik < state.threshold
        known = ~novel
        report.known.append(int(known.sum()))
        report.novel.append(int(novel.sum()))
        image_ids = (image - image.min()).numpy() if len(image) else image.numpy()

        batch_stats = ComponentStats.of_members(x[known], labels[known].numpy(),
                                                image_ids[known.numpy()], state.stats.n_components)
        state.stats = state.stats.decayed(decay(b, self.config.half_life)).merged(batch_stats)
        touched = np.flatnonzero(batch_stats.weight > 0)
        local_labels = torch.full((int(known.sum()),), -1, dtype=torch.int64)
        if state.counts is not None:
            local_labels = assign_locally(layer, cand_index[known], cand_cost[known],
                                          position[known], self.config.epsilon)
            state.counts *= decay(b, self.config.local_half_life)
            state.counts += pooled_counts(local_labels, position[known], layer.grid,
                                          state.stats.n_components, self._offsets)
        for replay, step in zip(replays, steps.tolist(), strict=True):
            mine = (image[known] == step)
            replay.features.append(x[known][mine].half())
            replay.positions.append(position[known][mine])
            replay.labels.append(labels[known][mine])
            replay.local_labels.append(local_labels[mine])

        state.buffer(x[novel], image[novel], position[novel], self.steps_, self.config)
        spawned = state.spawn(layer, self.config, self._offsets, self.base_.oas_formula)
        pruned = state.prune(self.config.prune_below)
        if pruned:  # component numbers moved: the reservoir (which remembers them) starts afresh
            self.reservoir_.clear()
        report.spawned.append(spawned)
        report.pruned.append(pruned)
        report.touched.append(len(touched) + spawned)
        self._refresh(index, touched, spawned, pruned)

    # --- consolidation (§7.2) -------------------------------------------------------------------

    def consolidate(self, iterations: int = 2) -> int:
        """Redo the hard assignments of the reservoir's images with the current parameters:
        their old contributions (decayed since) are taken out of the statistics and local counts
        and their new ones put in, `iterations` times (warm-started K-MLE on the replay set; hard
        assignments made early in a stream depend on its order). Returns the vectors relabelled
        in the last iteration. All or nothing, as `learn`."""
        with self._all_or_nothing():
            moved = 0
            for _ in range(iterations):
                moved = 0
                for index, state in enumerate(self.states_):
                    moved += self._reassign(index, state)
            return moved

    def _reassign(self, index: int, state: LayerState) -> int:
        layer = self.layers_[index]
        k = state.stats.n_components
        old_stats = new_stats = None
        old_counts = new_counts = 0.0
        moved = 0
        for replay in self.reservoir_:
            x = replay.features[index].float()
            if not len(x):
                continue
            age = self.steps_ - replay.step
            weight = decay(age, self.config.half_life)
            labels, _, cand_index, cand_cost = route(x, layer.factors, self.config.n_candidates)
            moved += int((labels != replay.labels[index]).sum())
            ids = np.zeros(len(x), dtype=np.int64)
            old = ComponentStats.of_members(x, replay.labels[index].numpy(), ids, k).scaled(weight)
            new = ComponentStats.of_members(x, labels.numpy(), ids, k).scaled(weight)
            old_stats = old if old_stats is None else old_stats.merged(old)
            new_stats = new if new_stats is None else new_stats.merged(new)
            replay.labels[index] = labels
            if state.counts is not None:
                local_weight = decay(age, self.config.local_half_life)
                local = assign_locally(layer, cand_index, cand_cost, replay.positions[index],
                                       self.config.epsilon)
                old_counts = old_counts + local_weight * pooled_counts(
                    replay.local_labels[index], replay.positions[index], layer.grid, k,
                    self._offsets)
                new_counts = new_counts + local_weight * pooled_counts(
                    local, replay.positions[index], layer.grid, k, self._offsets)
                replay.local_labels[index] = local
        if old_stats is None:
            return 0
        for stats in (old_stats, new_stats):  # the replayed images carry no support of their own
            stats.support[:] = 0
        state.stats = state.stats.without(old_stats).merged(new_stats)
        if state.counts is not None:
            state.counts = (state.counts - old_counts + new_counts).clamp_min_(0.0)
        touched = np.flatnonzero((old_stats.weight > 0) | (new_stats.weight > 0))
        self._refresh(index, touched, 0, 0)
        return moved

    # --- parameters -----------------------------------------------------------------------------

    def _refresh(self, index: int, touched: np.ndarray, spawned: int, pruned: int) -> None:
        """New parameters of layer `index`: OAS covariances of the touched components only
        (decay leaves the others' scatter and effective size, hence their OAS, unchanged)."""
        state, old = self.states_[index], self.layers_[index]
        shrunk = old.mixture.shrunk  # OAS, floored by the acquisition noise the fit measured
        if len(touched) and not pruned:
            state.covariances[touched] = shrunk(state.stats.select(touched), self.base_.oas_formula)
        elif pruned:  # indices moved: recompute all
            state.covariances = shrunk(state.stats, self.base_.oas_formula)
        mixture = replace(GaussianMixture.from_stats(state.stats, self.base_.oas_formula,
                                                     state.covariances), noise=old.mixture.noise)
        chol, ok = cholesky_with_jitter(mixture.covariances)
        if not ok.all():
            raise UnsoundUpdateError(f"layer {index + 1}: the covariances of Gaussians "
                                     f"{np.flatnonzero(~ok).tolist()} are not positive definite")
        factors = factors_from_cholesky(chol, mixture.means, mixture.weights)
        local = None
        if state.counts is not None:
            state.counts[state.counts < self.config.min_local_count] = 0.0
            weights = weights_from_counts(state.counts, torch.from_numpy(mixture.weights).float())
            local = LocalWeights.from_dense(weights, old.grid, state.counts)
        self.layers_[index] = replace(old, mixture=mixture, factors=factors, local=local,
                                           report=None)

    def model(self) -> GladModel:
        """The updated model: a new `GladModel` sharing the backbone, reference and ROI."""
        updated = copy.copy(self.base_)
        updated.layers_ = list(self.layers_)
        updated.online_ = dict(self.base_.online_) | {"steps": self.steps_,
                                                      "novelty_loglik": [s.threshold for s in
                                                                         self.states_]}
        updated.__dict__.pop("_device_layers", None)
        return updated


def layer_problems(layer: LayerModel) -> list[str]:
    """What is unsound in one layer's parameters (spec §7.6 step 1), as reasons; empty when
    nothing is. Beyond finiteness, no Gaussian may be so narrow that float32 costs overflow
    (`MAX_TYPICAL_COST`), and each statistic must still be a sample's: a candidate with finite
    factors can score NaN otherwise."""
    mixture, factors, stats = layer.mixture, layer.factors, layer.mixture.stats
    problems = []
    if not (np.isfinite(mixture.means).all() and np.isfinite(mixture.covariances).all()):
        problems.append("means or covariances are not finite")
    if not all(torch.isfinite(t).all() for t in (factors.whiteners, factors.offsets,
                                                  factors.logdets, factors.log_weights)):
        problems.append("whitening factors, log-determinants or log weights are not finite")
    if not (mixture.weights > 0).all() or abs(float(mixture.weights.sum()) - 1.0) > 1e-6:
        problems.append(f"mixture weights are not all positive or sum to {mixture.weights.sum():.8f}")
    if stats is not None:
        problems += _statistics_problems(stats, factors)
    if layer.local is not None:
        dense = layer.local.dense()
        rows = dense.sum(1)
        if not (torch.isfinite(dense).all() and torch.allclose(rows, torch.ones_like(rows),
                                                               atol=1e-4)):
            problems.append("local weights do not sum to 1 at every position")
    return problems


def _statistics_problems(stats: ComponentStats, factors: MixtureFactors) -> list[str]:
    """Sufficient statistics that no sample could have (non-positive weights, non-finite moments)
    or that are degenerate, and Gaussians too narrow for float32 costs."""
    problems = []
    fields_ok = np.isfinite(stats.mean).all(1) & np.isfinite(stats.scatter).all((1, 2))
    broken = ~((stats.weight > 0) & (stats.weight_sq > 0) & fields_ok)
    if broken.any():
        problems.append(f"Gaussians {np.flatnonzero(broken).tolist()} have statistics no sample "
                        "could have (weights not positive or moments not finite)")
        return problems
    scale = stats.pooled_trace()
    flat = np.flatnonzero(stats.degenerate(scale)).tolist()
    if flat:
        problems.append(f"Gaussians {flat} have (nearly) zero spread")
    typical = factors.whiteners.double().square().sum((1, 2)) * scale
    narrow = torch.nonzero(~(typical <= MAX_TYPICAL_COST)).flatten().tolist()
    if narrow:
        problems.append(f"Gaussians {narrow} are so narrow that float32 costs overflow")
    return problems
