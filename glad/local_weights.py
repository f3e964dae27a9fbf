"""Position-dependent mixture weights pi_k(x) learned by a localized K-MLE (spec §3, Eqs. 10-12).

The global Gaussians stay fixed; only the weights move. Each training vector keeps its L cheapest
components (`Candidates`), so the localized K-MLE never recomputes Mahalanobis distances. The
result is stored sparse (CSR over positions, CSC view over Gaussians for grouped scoring).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from glad.mixture import LOG_2PI, MixtureFactors, iter_costs, logsumexp_

log = logging.getLogger(__name__)

DEFAULT_CANDIDATES = 32
PREFIX = 4  # cheapest candidates every local assignment tries first (see _PrefixSearch)


@dataclass
class Candidates:
    """The L cheapest components of every training vector, by global assignment cost (§3.3),
    sorted by their cost c_k within each vector."""

    index: torch.Tensor  # int32 (M, HW, L) component ids (int32: 0.1 GB less on layer 1)
    cost: torch.Tensor  # float32 (M, HW, L) c_k = D_k + logdet_k (no weight term), ascending
    valid: torch.Tensor  # bool (M, HW)
    # float32 (M, HW): each vector's log-likelihood under the global mixture, a by-product of
    # the same pass for the images asked for (NaN elsewhere); None for subsets
    loglik: torch.Tensor | None = None
    # float32 (U, HW, K): those images' costs against every Gaussian, in increasing image index,
    # when kept (model selection scores each localisation candidate from them); else None
    full_costs: torch.Tensor | None = None

    def of_images(self, images: np.ndarray) -> Candidates:
        """The candidates of the given training images only."""
        return Candidates(self.index[images], self.cost[images], self.valid[images])


def top_candidates(
    features: torch.Tensor, valid: torch.Tensor, factors: MixtureFactors,
    n_candidates: int = DEFAULT_CANDIDATES, loglik_images: np.ndarray | None = None,
    keep_costs: bool = False,
) -> Candidates:
    """Rank components per vector by the global cost c_k - 2 log pi_k and keep the best L,
    sorted by c_k (as `_PrefixSearch` needs them).

    The same pass gives the global log-likelihood of the vectors of `loglik_images` (indices
    into the M images; their `loglik` rows, NaN for the others) and, with `keep_costs`, their
    costs against every Gaussian (`full_costs`).
    """
    m, hw, d = features.shape
    n_candidates = min(n_candidates, factors.n_components)
    index = torch.empty(m, hw, n_candidates, dtype=torch.int32)
    cost = torch.empty(m, hw, n_candidates, dtype=torch.float32)
    loglik = torch.full((m, hw), math.nan)
    wanted = np.zeros(m, dtype=bool)
    if loglik_images is not None:
        wanted[loglik_images] = True
    penalty = (-2.0 * factors.log_weights).to(torch.float32)
    full_costs = None
    for images, with_loglik in ((np.flatnonzero(wanted), True), (np.flatnonzero(~wanted), False)):
        if not len(images):
            continue
        rows = torch.from_numpy(images)
        flat = features[rows].reshape(-1, d)
        group_index = torch.empty(len(flat), n_candidates, dtype=torch.int32)
        group_cost = torch.empty(len(flat), n_candidates, dtype=torch.float32)
        group_loglik = torch.empty(len(flat))
        if with_loglik and keep_costs:
            full_costs = torch.empty(len(flat), factors.n_components)
        for start, costs in iter_costs(flat, factors):
            chunk = slice(start, start + len(costs))
            if with_loglik and keep_costs:
                full_costs[chunk] = costs
            total = costs + penalty
            _, idx = torch.topk(total, n_candidates, dim=1, largest=False, sorted=False)
            group_cost[chunk], order = torch.sort(torch.gather(costs, 1, idx), dim=1)
            group_index[chunk] = torch.gather(idx, 1, order)
            if with_loglik:
                group_loglik[chunk] = logsumexp_(total.mul_(-0.5), dim=1).sub_(0.5 * d * LOG_2PI)
        index[rows], cost[rows] = group_index.view(len(images), hw, -1), group_cost.view(
            len(images), hw, -1)
        if with_loglik:
            loglik[rows] = group_loglik.view(len(images), hw)
    if full_costs is not None:
        full_costs = full_costs.view(int(wanted.sum()), hw, -1)
    return Candidates(index, cost, valid.bool(), loglik, full_costs)


MAX_TILE = 256  # positions per tile of the batched sparse scoring (a bmm entry has B x tile rows)
MIN_TILE = 4  # the smallest padded tile: fewer, larger buckets at the cost of a little padding
TILE_STEPS_PER_OCTAVE = 4  # tile lengths grow by 2^(1/4): under 19% padding, at most 25 buckets


@dataclass(frozen=True)
class TileBucket:
    """Tiles of one length T: each holds up to T positions of a single Gaussian, padded (§4.6)."""

    components: torch.Tensor  # int64 (n,): the Gaussian of each tile
    positions: torch.Tensor  # int64 (n * T,): its positions; padding repeats the tile's first one
    log_weights: torch.Tensor  # float32 (n, T): log pi_k(x) at those positions; padding 0

    @property
    def tile(self) -> int:
        return self.log_weights.shape[1]


@dataclass(frozen=True)
class ScoringTiles:
    """The (position, Gaussian) pairs of LocalWeights laid out for batched sparse scoring (§4.6).

    Each Gaussian's position list is cut into tiles of MAX_TILE positions; the remainder is padded
    to the next of `tile_lengths()` and joins the bucket of that length, so one batched GEMM per
    bucket (and chunk) whitens every pair, with under 19% padding of the remainders.
    The buckets' tiles, concatenated, number the pair slots; `slots` holds each position's active
    slots (a column, padded with the sentinel `n_slots`), so the log-sum-exp over a position's
    Gaussians is a gather and a dense reduction over the leading axis (which vectorises across
    positions; reducing a middle axis of (HW, S, B), torch's amax is 5x slower) instead of a
    scatter.
    """

    buckets: tuple[TileBucket, ...]
    slots: torch.Tensor  # int64 (S_max, HW), S_max the largest number of Gaussians at a position
    n_slots: int


@dataclass
class LocalWeights:
    """Sparse pi_k(x) of one layer: CSR rows = positions, with cached per-device views for scoring
    (CSC over Gaussians, scoring tiles, a dense log-weight mask)."""

    grid: tuple[int, int]
    n_components: int
    indptr: np.ndarray  # int64 (HW + 1,)
    components: np.ndarray  # int32 (nnz,)
    log_weights: np.ndarray  # float32 (nnz,), log pi_k(x)
    # float32 (nnz,): the pooled assignment counts c_k(x) behind the weights, which online
    # updates decay and add to (spec §7.3); None for models that cannot be updated.
    counts: np.ndarray | None = None
    # Derived views keyed by (kind, device); the arrays above are never modified in place (online
    # updates build new LocalWeights), so the views never go stale.
    _cache: dict[tuple[str, str], object] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dense(cls, weights: torch.Tensor, grid: tuple[int, int],
                   counts: torch.Tensor | None = None) -> LocalWeights:
        """From a dense (HW, K) weight matrix whose rows sum to 1 (zeros are left out), and the
        dense counts behind it, if known."""
        positions, components = torch.nonzero(weights > 0, as_tuple=True)
        values = weights[positions, components]
        indptr = np.zeros(weights.shape[0] + 1, dtype=np.int64)
        np.cumsum(np.bincount(positions.numpy(), minlength=weights.shape[0]), out=indptr[1:])
        kept = None if counts is None else counts[positions, components].numpy().astype(np.float32)
        return cls(grid, weights.shape[1], indptr, components.numpy().astype(np.int32),
                   torch.log(values).numpy().astype(np.float32), kept)

    @property
    def nnz(self) -> int:
        return len(self.components)

    @property
    def n_positions(self) -> int:
        return len(self.indptr) - 1

    def dense(self) -> torch.Tensor:
        """Dense (HW, K) float32 weights."""
        return self._scatter(np.exp(self.log_weights))

    def dense_counts(self) -> torch.Tensor:
        """Dense (HW, K) float32 counts c_k(x); raises when the model kept none."""
        if self.counts is None:
            raise ValueError("these local weights carry no counts (fitted before online updates)")
        return self._scatter(self.counts)

    def dense_log(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Dense (HW, K) float32 log pi_k(x), -inf where inactive: the mask of dense scoring (§4.6)."""
        key = ("dense_log", str(device))
        if key not in self._cache:
            out = self._scatter(self.log_weights, fill=-math.inf)
            self._cache[key] = out.to(device)
        return self._cache[key]

    def _scatter(self, values: np.ndarray, fill: float = 0.0) -> torch.Tensor:
        out = torch.full((self.n_positions, self.n_components), fill)
        out[torch.from_numpy(self._rows()), torch.from_numpy(self.components).long()] = (
            torch.from_numpy(np.asarray(values, np.float32)))
        return out

    def _rows(self) -> np.ndarray:
        """The position of every stored pair (CSR row indices)."""
        return np.repeat(np.arange(self.n_positions), np.diff(self.indptr))

    def csc(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gptr (K+1,), positions (nnz,), log weights (nnz,)) grouped by Gaussian (§3.4).

        `gptr` stays on the CPU (it indexes host-side bookkeeping); the others live on `device`.
        """
        key = ("csc", str(device))
        if key not in self._cache:
            order = np.argsort(self.components, kind="stable")
            gptr = np.zeros(self.n_components + 1, dtype=np.int64)
            np.cumsum(np.bincount(self.components, minlength=self.n_components), out=gptr[1:])
            self._cache[key] = (torch.from_numpy(gptr),
                                torch.from_numpy(self._rows()[order]).to(device),
                                torch.from_numpy(self.log_weights[order]).to(device))
        return self._cache[key]

    def tiles(self, device: torch.device | str = "cpu") -> ScoringTiles:
        """The pairs cut into padded per-Gaussian tiles for batched sparse scoring (§4.6), built
        once per device."""
        key = ("tiles", str(device))
        if key not in self._cache:
            self._cache[key] = self._build_tiles(device)
        return self._cache[key]

    def _build_tiles(self, device: torch.device | str) -> ScoringTiles:
        gptr, positions, log_w = (t.numpy() for t in self.csc("cpu"))
        sizes = np.diff(gptr)
        full = sizes // MAX_TILE
        rest = sizes - full * MAX_TILE
        # Tiles as (Gaussian, first pair in CSC order, pair count, padded length).
        comp = np.concatenate([np.repeat(np.arange(self.n_components), full),
                               np.flatnonzero(rest)])
        first = np.concatenate([np.repeat(gptr[:-1], full) + _ranks(full) * MAX_TILE,
                                gptr[:-1][rest > 0] + full[rest > 0] * MAX_TILE])
        count = np.concatenate([np.full(full.sum(), MAX_TILE), rest[rest > 0]])
        lengths = tile_lengths()
        padded = lengths[np.searchsorted(lengths, count)]
        pair_slot = np.empty(self.nnz, dtype=np.int64)
        buckets, offset = [], 0
        for tile in sorted(set(padded.tolist()), reverse=True):
            chosen = padded == tile
            within = np.arange(tile)
            used = within < count[chosen, None]
            pair = first[chosen, None] + np.where(used, within, 0)
            pair_slot[pair[used]] = offset + np.flatnonzero(used)
            buckets.append(TileBucket(
                torch.from_numpy(comp[chosen]).to(device),
                torch.from_numpy(positions[pair].ravel()).to(device),
                torch.from_numpy(np.where(used, log_w[pair], 0.0).astype(np.float32)).to(device)))
            offset += used.size
        # Each position's slots: pairs sorted by position, ranked within it.
        order = np.argsort(positions, kind="stable")
        support = np.diff(self.indptr)
        slots = np.full((max(1, int(support.max(initial=0))), self.n_positions), offset, np.int64)
        slots[_ranks(support), positions[order]] = pair_slot[order]
        return ScoringTiles(tuple(buckets), torch.from_numpy(slots).to(device), offset)

    def pair_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat, slots): each stored pair's index into a position-major (HW * K) array, and each
        position's pairs as a column of `slots` (S_max, HW), padded with `nnz`: how a table of
        costs against every Gaussian is read under these weights
        (`glad.scoring.loglik_from_costs`). Built once."""
        key = ("pairs", "cpu")
        if key not in self._cache:
            flat = self._rows() * self.n_components + self.components.astype(np.int64)
            support = np.diff(self.indptr)
            rank = np.arange(max(1, int(support.max(initial=0))))[:, None]
            slots = np.where(rank < support, self.indptr[:-1] + rank, self.nnz)
            self._cache[key] = (torch.from_numpy(flat), torch.from_numpy(slots))
        return self._cache[key]

    def mean_support(self) -> float:
        """Average number of active Gaussians per position."""
        return self.nnz / max(1, self.n_positions)


def tile_lengths() -> np.ndarray:
    """The padded tile lengths: MIN_TILE to MAX_TILE in TILE_STEPS_PER_OCTAVE steps per doubling."""
    steps = TILE_STEPS_PER_OCTAVE * np.log2(MAX_TILE / MIN_TILE)
    grid = MIN_TILE * 2.0 ** (np.arange(int(steps) + 1) / TILE_STEPS_PER_OCTAVE)
    return np.unique(np.append(np.ceil(grid - 1e-9).astype(np.int64), MAX_TILE))


def _ranks(counts: np.ndarray) -> np.ndarray:
    """0, 1, ..., c-1 for each count c, concatenated."""
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(int(counts.sum())) - starts


def neighbourhood(radius: int, shape: str = "disk") -> list[tuple[int, int]]:
    """Offsets of the pooling neighbourhood B_r: Euclidean disk (5 cells at r=1) or square (E7)."""
    span = range(-radius, radius + 1)
    if shape == "square":
        return [(dy, dx) for dy in span for dx in span]
    if shape == "disk":
        return [(dy, dx) for dy in span for dx in span if dy * dy + dx * dx <= radius * radius]
    raise ValueError(f"unknown neighbourhood {shape!r}; use 'disk' or 'square'")


def fit_local_weights(
    candidates: Candidates,
    global_log_weights: torch.Tensor,
    grid: tuple[int, int],
    radius: int = 1,
    shape: str = "disk",
    mode: str = "blur",
    max_iter: int = 100,
    rel_tol: float = 1e-6,
) -> LocalWeights:
    """Localized K-MLE from the global weights (init decision of §3.3).

    mode "kmle": every position x assigns its own pooled set with its own weights (the literal
    Eq. 10); mode "blur": each vector is assigned once with the weights of its own position and
    count maps are pooled over the neighbourhood (the paper's "blur"; |B_r| times fewer argmins).
    """
    if mode not in ("kmle", "blur"):
        raise ValueError(f"unknown local mode {mode!r}; use 'kmle' or 'blur'")
    hw, k = grid[0] * grid[1], len(global_log_weights)
    offsets = neighbourhood(radius, shape)
    log_pi = global_log_weights.to(torch.float32).expand(hw, k).contiguous()
    global_pi = torch.exp(log_pi[0])
    previous, previous_labels = None, None
    search = _PrefixSearch.of(candidates.cost, candidates.index) if mode == "blur" else None
    for iteration in range(max_iter):
        if mode == "blur":
            counts, labels, objective = _blur_counts(candidates, search, log_pi, grid, offsets)
        else:
            counts, labels, objective = _pooled_counts(candidates, log_pi, grid, offsets)
        weights = weights_from_counts(counts, global_pi)
        log_pi = torch.log(weights)
        changed = previous_labels is None or not torch.equal(labels, previous_labels)
        converged = previous is not None and abs(objective - previous) <= rel_tol * abs(previous)
        log.debug("local K-MLE iteration %d: objective %.6g", iteration, objective)
        if not changed or converged:
            break
        previous, previous_labels = objective, labels
    return LocalWeights.from_dense(weights, grid, counts)


def weights_from_counts(counts: torch.Tensor, global_pi: torch.Tensor) -> torch.Tensor:
    """pi_k(x) = c_k(x) / N(x) (Eq. 11); positions no sample reached keep the global weights."""
    total = counts.sum(1, keepdim=True)
    return torch.where(total > 0, counts / total.clamp_min(1e-12), global_pi)


def pool_counts(counts: torch.Tensor, grid: tuple[int, int],
                offsets: list[tuple[int, int]]) -> torch.Tensor:
    """Counts (HW, K) summed over each position's neighbourhood x + B_r (the paper's "blur")."""
    k = counts.shape[1]
    kernel = torch.zeros(1, 1, *_kernel_shape(offsets))
    r = kernel.shape[-1] // 2
    for dy, dx in offsets:
        kernel[0, 0, dy + r, dx + r] = 1.0
    maps = counts.t().reshape(1, k, *grid)  # one channel per Gaussian: a depthwise convolution
    return F.conv2d(maps, kernel.expand(k, 1, -1, -1), padding=r, groups=k).reshape(k, -1).t()


@dataclass(frozen=True)
class _PrefixSearch:
    """A candidate table laid out for repeated local assignments, Eq. 10 restricted to
    candidates: argmin_k c_k - 2 log pi_k(x), where -inf weights never win.

    Candidates come sorted by cost and -2 log pi_k(x) >= 0, so no candidate beyond the first
    PREFIX can beat their best total when it costs more than that total: only the vectors where
    it does not are searched in full (under 2% of them on real layers, none after the first
    iterations), so an iteration reads PREFIX of the L candidates instead of all L. The prefix
    is copied out once, as gathers through a strided slice of the table cost twice as much.
    """

    cost: torch.Tensor  # (..., L), sorted ascending
    index: torch.Tensor  # (..., L), any integer type
    head_cost: torch.Tensor  # (..., PREFIX), contiguous
    head_index: torch.Tensor  # int64, as gathers index
    next_cost: torch.Tensor | None  # (...,) the cost of candidate PREFIX + 1; None: L <= PREFIX

    @classmethod
    def of(cls, cost: torch.Tensor, index: torch.Tensor) -> _PrefixSearch:
        width = min(PREFIX, cost.shape[-1])
        after = cost[..., width].contiguous() if width < cost.shape[-1] else None
        return cls(cost, index, cost[..., :width].contiguous(), index[..., :width].long().contiguous(),
                   after)

    def argmin(self, log_pi_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels and totals under the log-weights `log_pi_rows` (..., K) of each vector."""
        labels, best = _argmin_among(self.head_cost, self.head_index, log_pi_rows)
        if self.next_cost is not None:
            unsure = self.next_cost <= best
            if unsure.any():
                labels[unsure], best[unsure] = _argmin_among(
                    self.cost[unsure], self.index[unsure].long(), log_pi_rows[unsure])
        return labels, best


def _argmin_among(cost: torch.Tensor, index: torch.Tensor, log_pi_rows: torch.Tensor):
    """Labels and totals of argmin_k c_k - 2 log pi_k over all the given candidates."""
    total = cost - 2.0 * torch.gather(log_pi_rows, -1, index)
    best, slot = torch.min(total, dim=-1)
    labels = torch.gather(index, -1, slot[..., None])[..., 0]
    return labels, best


def _blur_counts(candidates, search, log_pi, grid, offsets):
    m, hw, _ = candidates.index.shape
    k = log_pi.shape[1]
    labels, best = search.argmin(log_pi.unsqueeze(0).expand(m, hw, k))
    ok = candidates.valid & torch.isfinite(best)
    positions = torch.arange(hw).expand(m, hw)
    counts = torch.bincount((positions * k + labels)[ok], minlength=hw * k).float().view(hw, k)
    return pool_counts(counts, grid, offsets), labels, -0.5 * float(best[ok].double().sum())


def _pooled_counts(candidates, log_pi, grid, offsets):
    """Per-position K-MLE: for each offset delta, vectors at x+delta are assigned with pi(x)."""
    m, hw, _ = candidates.index.shape
    k = log_pi.shape[1]
    h, w = grid
    counts = torch.zeros(hw * k)
    all_labels, objective = [], 0.0
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    for dy, dx in offsets:
        inside = ((ys + dy >= 0) & (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)).flatten()
        target = torch.nonzero(inside).flatten()
        source = target + dy * w + dx
        search = _PrefixSearch.of(candidates.cost[:, source], candidates.index[:, source])
        labels, best = search.argmin(log_pi[target].unsqueeze(0).expand(m, -1, -1))
        ok = candidates.valid[:, source] & torch.isfinite(best)
        counts += torch.bincount((target * k + labels)[ok], minlength=hw * k).float()
        all_labels.append(labels)
        objective -= 0.5 * float(best[ok].double().sum())
    return counts.view(hw, k), torch.cat(all_labels, dim=1), objective


def _kernel_shape(offsets: list[tuple[int, int]]) -> tuple[int, int]:
    r = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    return 2 * r + 1, 2 * r + 1
