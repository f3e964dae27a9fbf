"""One layer's state under online K-MLE (spec §7.2-7.5) and the update rules that need no more
than it: forgetting, local counts pooled over the localisation radius, the novelty buffer, and
Gaussians spawned from it or pruned once they fade.

`glad.online_kmle.OnlineGlad` is the stateful wrapper around these: it routes each batch's
vectors, keeps the image count and the replay reservoir, and makes every update all or nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from glad.errors import FeatureError
from glad.layer_fit import LayerModel
from glad.local_weights import pool_counts
from glad.mixture import ComponentStats, assign, fit_kmle, global_loglik


@dataclass(frozen=True)
class OnlineConfig:
    """How fast the model forgets and when it grows (spec §7.2-7.5 defaults)."""

    half_life: float = 5000.0  # images: global statistics
    local_half_life: float = 1000.0  # images: local counts (placement adapts faster)
    epsilon: float = 1e-3  # local prior floor for assignment, so a known look may move
    min_local_count: float = 0.5  # local counts below this are dropped (sparsity)
    n_candidates: int = 8  # components considered per vector for the local assignment
    spawn_min_images: int = 3  # a new Gaussian needs members from this many images
    spawn_min_members: int = 32
    spawn_max_new: int = 16  # new Gaussians per spawn at most
    buffer_max_age: int = 500  # images: older novelty-buffer entries are discarded
    buffer_max_rows: int = 20_000  # per layer
    prune_below: float = 2.0  # non-base components with a smaller effective count go
    reservoir_images: int = 16  # recent images replayed by `consolidate`


def decay(images: int, half_life: float) -> float:
    """The factor that `images` images of forgetting with `half_life` (in images) leave."""
    return 0.5 ** (images / half_life) if half_life > 0 else 1.0


def assign_locally(layer: LayerModel, cand_index: torch.Tensor, cand_cost: torch.Tensor,
                   position: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Eq. 10 with the epsilon-smoothed local prior (1 - eps) pi_k(x) + eps pi_k (§7.3), so a
    known Gaussian can become normal at a position where it never was."""
    local = layer.local.dense()[position]  # (n, K)
    prior = (1.0 - epsilon) * torch.gather(local, 1, cand_index) + epsilon * torch.exp(
        layer.factors.log_weights.float())[cand_index]
    total = cand_cost - 2.0 * torch.log(prior)
    return torch.gather(cand_index, 1, total.argmin(1, keepdim=True))[:, 0]


def pooled_counts(labels: torch.Tensor, position: torch.Tensor, grid: tuple[int, int], k: int,
                  offsets: list[tuple[int, int]] | None) -> torch.Tensor:
    """Local counts (HW, k) of vectors labelled `labels` at `position`, pooled over the
    localisation neighbourhood `offsets`."""
    hw = grid[0] * grid[1]
    counts = torch.bincount(position * k + labels, minlength=hw * k).float().view(hw, k)
    return pool_counts(counts, grid, offsets)


@dataclass
class LayerState:
    """The updatable state of one layer."""

    stats: ComponentStats
    covariances: np.ndarray
    counts: torch.Tensor | None  # (HW, K) local counts c_k(x); None: global weights only
    threshold: float  # novelty log-likelihood (§7.4)
    buffer_x: torch.Tensor  # (n, d) novel vectors
    buffer_image: torch.Tensor  # (n,) image step
    buffer_pos: torch.Tensor  # (n,) position

    @classmethod
    def of(cls, layer: LayerModel, threshold: float) -> LayerState:
        """The state a fitted layer (with sufficient statistics) starts from, its buffer empty."""
        counts = None
        if layer.local is not None:
            counts = layer.local.dense_counts()
        d = layer.mixture.means.shape[1]
        return cls(layer.mixture.stats, layer.mixture.covariances.copy(), counts, float(threshold),
                   torch.zeros(0, d), torch.zeros(0, dtype=torch.int64),
                   torch.zeros(0, dtype=torch.int64))

    def copy(self) -> LayerState:
        """A copy that updates of this one (in place on covariances and counts) leave alone."""
        counts = None if self.counts is None else self.counts.clone()
        return replace(self, covariances=self.covariances.copy(), counts=counts)

    # --- novelty (§7.4) -------------------------------------------------------------------------

    def buffer(self, x: torch.Tensor, image: torch.Tensor, position: torch.Tensor, now: int,
               config: OnlineConfig) -> None:
        """Add novel vectors (with their image step and position) to the buffer, dropping
        entries older than `buffer_max_age` images at step `now` and the oldest beyond
        `buffer_max_rows`."""
        keep = self.buffer_image > now - config.buffer_max_age
        self.buffer_x = torch.cat([self.buffer_x[keep], x])[-config.buffer_max_rows:]
        self.buffer_image = torch.cat([self.buffer_image[keep], image])[-config.buffer_max_rows:]
        self.buffer_pos = torch.cat([self.buffer_pos[keep], position])[-config.buffer_max_rows:]

    def spawn(self, layer: LayerModel, config: OnlineConfig, offsets: list[tuple[int, int]] | None,
              oas_formula: str) -> int:
        """New Gaussians from buffered vectors: K-MLE on the buffer; a component is kept when it
        has enough members from at least `spawn_min_images` images, 80 % of its members are
        still unlikely under the current mixture (so it duplicates nothing), and its members
        are not all (nearly) the same vector (`ComponentStats.degenerate`: a flat region shown
        by three images, or one image confirmed three times, has a zero scatter, hence a zero
        covariance). K-MLE prunes such clusters, but re-assigning the buffer with the fitted
        mixture can gather one again. Returns how many were added."""
        d = self.buffer_x.shape[1]
        needed = max(256, 2 * d)
        images = torch.unique(self.buffer_image)
        if len(self.buffer_x) < needed or len(images) < config.spawn_min_images:
            return 0
        x, image_ids = self.buffer_x, torch.searchsorted(images, self.buffer_image).numpy()
        k = int(np.clip(len(x) // config.spawn_min_members, 1, config.spawn_max_new))
        try:
            fitted, _ = fit_kmle(x, image_ids, k, max_iter=10, n_min=config.spawn_min_members,
                                 min_images=config.spawn_min_images)
        except FeatureError:  # every component pruned: nothing coherent yet, try again later
            return 0
        labels, _, _ = assign(x, fitted.factors())
        unlikely = global_loglik(x, layer.factors) < self.threshold
        members = ComponentStats.of_members(x, labels.numpy(), image_ids, fitted.n_components)
        share = np.bincount(labels[unlikely].numpy(), minlength=fitted.n_components) / np.maximum(
            members.weight, 1.0)
        accepted = np.flatnonzero((members.weight >= config.spawn_min_members)
                                  & (members.support >= config.spawn_min_images) & (share >= 0.8)
                                  & ~members.degenerate(self.stats.pooled_trace()))
        if not len(accepted):
            return 0
        relabel = torch.full((fitted.n_components,), -1, dtype=torch.int64)
        relabel[torch.from_numpy(accepted)] = torch.arange(len(accepted))
        new_labels = relabel[labels]
        take = new_labels >= 0
        k_old = self.stats.n_components
        new_stats = members.select(accepted)
        self.stats = self.stats.concat(new_stats)
        self.covariances = np.concatenate([self.covariances,
                                           layer.mixture.shrunk(new_stats, oas_formula)])
        if self.counts is not None:
            grown = torch.zeros(self.counts.shape[0], len(accepted))
            self.counts = torch.cat([self.counts, grown], dim=1)
            self.counts += pooled_counts(new_labels[take] + k_old, self.buffer_pos[take],
                                         layer.grid, k_old + len(accepted), offsets)
        self.buffer_x, self.buffer_image = self.buffer_x[~take], self.buffer_image[~take]
        self.buffer_pos = self.buffer_pos[~take]
        return len(accepted)

    def prune(self, below: float) -> int:
        """Drop grown (non-base) components whose effective count faded below `below` (§7.5).
        Returns how many went; the others' numbers move when any did."""
        fading = (self.stats.floor <= 0) & (self.stats.weight < below)
        if not fading.any():
            return 0
        keep = np.flatnonzero(~fading)
        self.stats = self.stats.select(keep)
        self.covariances = self.covariances[keep]
        if self.counts is not None:
            self.counts = self.counts[:, torch.from_numpy(keep)]
        return int(fading.sum())
