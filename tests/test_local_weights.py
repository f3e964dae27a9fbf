"""Local weight maps (spec §3): normalisation, support, sparse views, and spatial localisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from glad.local_weights import (
    PREFIX,
    LocalWeights,
    _argmin_among,
    _PrefixSearch,
    fit_local_weights,
    neighbourhood,
    top_candidates,
)
from glad.mixture import GaussianMixture

MODES = ("blur", "kmle")


def mixture_of(means: np.ndarray, weights: np.ndarray, scale: float = 1.0) -> GaussianMixture:
    k, d = means.shape
    covariances = np.repeat(np.eye(d)[None] * scale, k, axis=0)
    return GaussianMixture(np.asarray(weights, float), means, covariances, np.full(k, 10),
                           np.full(k, 3))


def random_problem(seed: int, k: int = 6, d: int = 3, grid=(5, 6), m: int = 4):
    """Features of M images on a grid, drawn from a random K-component mixture."""
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=3.0, size=(k, d))
    weights = rng.uniform(0.5, 1.0, size=k)
    mixture = mixture_of(means, weights / weights.sum())
    hw = grid[0] * grid[1]
    labels = rng.integers(k, size=(m, hw))
    features = means[labels] + rng.normal(size=(m, hw, d))
    return mixture, torch.from_numpy(features.astype(np.float32)), grid


def pooled_sets(grid, offsets):
    """For every position x, the positions y = x + delta inside the grid."""
    h, w = grid
    out = []
    for r in range(h):
        for c in range(w):
            out.append([(r + dy) * w + (c + dx) for dy, dx in offsets
                        if 0 <= r + dy < h and 0 <= c + dx < w])
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", ["disk", "square"])
def test_weights_sum_to_one_per_position(mode: str, shape: str) -> None:
    mixture, features, grid = random_problem(0)
    factors = mixture.factors()
    valid = torch.ones(features.shape[:2], dtype=torch.bool)
    candidates = top_candidates(features, valid, factors, n_candidates=4)
    local = fit_local_weights(candidates, factors.log_weights, grid, radius=1, shape=shape,
                              mode=mode)
    dense = local.dense()
    assert dense.shape == (grid[0] * grid[1], mixture.n_components)
    assert (dense >= 0).all()
    np.testing.assert_allclose(dense.sum(1).numpy(), 1.0, atol=1e-5)
    assert local.nnz < dense.numel()  # localisation made it sparser than the global start


@pytest.mark.parametrize("mode", MODES)
def test_support_within_global_support_and_pooled_candidates(mode: str) -> None:
    mixture, features, grid = random_problem(1, k=6)
    # Component 5 has zero global weight: log pi = -inf, it must never appear locally.
    weights = mixture.weights.copy()
    weights[5] = 0.0
    mixture = GaussianMixture(weights / weights.sum(), mixture.means, mixture.covariances,
                              mixture.counts, mixture.image_support)
    factors = mixture.factors()
    assert factors.log_weights[5] == -np.inf
    valid = torch.ones(features.shape[:2], dtype=torch.bool)
    candidates = top_candidates(features, valid, factors, n_candidates=3)
    dense = fit_local_weights(candidates, factors.log_weights, grid, mode=mode).dense().numpy()
    assert (dense[:, 5] == 0).all()
    # pi_k(x) > 0 only if some pooled sample (m, y), y in x + B_r, has k among its candidates.
    index = candidates.index.numpy()
    for x, ys in enumerate(pooled_sets(grid, neighbourhood(1, "disk"))):
        seen = set(np.unique(index[:, ys]).tolist())
        support = set(np.flatnonzero(dense[x] > 0).tolist())
        assert support <= seen, (x, support, seen)


def test_kmle_support_only_shrinks_over_iterations() -> None:
    mixture, features, grid = random_problem(2, k=6)
    factors = mixture.factors()
    valid = torch.ones(features.shape[:2], dtype=torch.bool)
    candidates = top_candidates(features, valid, factors, n_candidates=6)  # all: exact
    previous = np.ones((grid[0] * grid[1], 6), dtype=bool)  # the global start: full support
    for iterations in range(1, 6):
        dense = fit_local_weights(candidates, factors.log_weights, grid, mode="kmle",
                                  max_iter=iterations, rel_tol=0.0).dense().numpy()
        support = dense > 0
        assert not (support & ~previous).any(), f"support grew at iteration {iterations}"
        previous = support


def test_top_candidates_are_the_cheapest_components() -> None:
    mixture, features, grid = random_problem(3, k=7, d=4)
    factors = mixture.factors()
    valid = torch.ones(features.shape[:2], dtype=torch.bool)
    candidates = top_candidates(features, valid, factors, n_candidates=3)
    assert candidates.index.shape == (4, grid[0] * grid[1], 3)
    u = features.numpy().astype(np.float64)[..., None, :]  # (M, HW, 1, d)
    cost = ((u - mixture.means) ** 2).sum(-1) + np.linalg.slogdet(mixture.covariances)[1]
    ranked = cost - 2 * np.log(mixture.weights)  # identity covariances: D = squared distance
    best3 = np.sort(np.argsort(ranked, axis=-1)[..., :3], axis=-1)
    np.testing.assert_array_equal(np.sort(candidates.index.numpy(), axis=-1), best3)
    chosen = np.take_along_axis(cost, candidates.index.numpy(), axis=-1)
    np.testing.assert_allclose(candidates.cost.numpy(), chosen, rtol=1e-4, atol=1e-3)


def test_local_assignment_searching_a_prefix_equals_the_full_search() -> None:
    """Candidates sorted by cost: trying the first PREFIX and searching the rest only where it
    could win gives the labels and totals of the search over all of them, including vectors
    whose first candidates have zero weight (-inf log) at their position and vectors with none."""
    rng = np.random.default_rng(5)
    m, hw, width, k = 6, 40, 12, 30
    cost = torch.from_numpy(np.sort(rng.exponential(4.0, size=(m, hw, width)), axis=-1)).float()
    index = torch.from_numpy(np.stack([[rng.permutation(k)[:width] for _ in range(hw)]
                                       for _ in range(m)]))
    log_pi = torch.log(torch.from_numpy(rng.dirichlet(np.full(k, 0.3), size=hw)).float())
    log_pi[rng.random((hw, k)) < 0.3] = -math.inf
    log_pi[0] = -math.inf  # position 0: no candidate has any weight
    rows = log_pi.unsqueeze(0).expand(m, hw, k)
    labels, best = _PrefixSearch.of(cost, index).argmin(rows)
    full_labels, full_best = _argmin_among(cost, index, rows)
    assert width > PREFIX
    torch.testing.assert_close(best, full_best)
    finite = torch.isfinite(full_best)
    assert not finite[:, 0].any() and finite.float().mean() > 0.9
    torch.testing.assert_close(labels[finite], full_labels[finite])
    outside = (torch.gather(rows, -1, index[..., :PREFIX]) == -math.inf).all(-1) & finite
    assert outside.any()  # some winners came from beyond the prefix


@pytest.mark.parametrize("mode", MODES)
def test_left_right_components_localise(mode: str) -> None:
    """Component A only ever seen on the left half, B only on the right half."""
    rng = np.random.default_rng(4)
    mixture = mixture_of(np.array([[-6.0, 0.0], [6.0, 0.0]]), np.array([0.5, 0.5]))
    factors = mixture.factors()
    h, w, m = 6, 10, 8
    column = np.tile(np.arange(w), h)
    means = np.where((column < w // 2)[:, None], mixture.means[0], mixture.means[1])
    features = means[None] + rng.normal(scale=0.7, size=(m, h * w, 2))
    features = torch.from_numpy(features.astype(np.float32))
    valid = torch.ones(m, h * w, dtype=torch.bool)
    candidates = top_candidates(features, valid, factors, n_candidates=2)
    dense = fit_local_weights(candidates, factors.log_weights, (h, w), radius=1,
                              mode=mode).dense().numpy()
    a = dense[:, 0].reshape(h, w)
    b = dense[:, 1].reshape(h, w)
    np.testing.assert_allclose(a[:, : w // 2 - 1], 1.0, atol=1e-6)  # well inside the left half
    np.testing.assert_allclose(b[:, w // 2 + 1 :], 1.0, atol=1e-6)  # well inside the right half
    assert (a[:, w // 2 - 1] > 0.5).all() and (b[:, w // 2] > 0.5).all()  # boundary columns
    assert (a[:, w // 2 - 1] < 1.0).all() and (b[:, w // 2] < 1.0).all()  # see across it


def test_invalid_samples_are_left_out() -> None:
    """Samples with valid=False do not vote: making every B sample invalid removes B."""
    rng = np.random.default_rng(5)
    mixture = mixture_of(np.array([[-6.0, 0.0], [6.0, 0.0]]), np.array([0.5, 0.5]))
    factors = mixture.factors()
    m, hw = 4, 12
    comp = rng.integers(2, size=(m, hw))
    comp[0] = 0  # every position has at least one valid A sample
    features = torch.from_numpy((mixture.means[comp] + rng.normal(scale=0.5, size=(m, hw, 2)))
                                .astype(np.float32))
    valid = torch.from_numpy(comp == 0)
    candidates = top_candidates(features, valid, factors, n_candidates=2)
    for mode in MODES:
        dense = fit_local_weights(candidates, factors.log_weights, (3, 4), mode=mode).dense()
        np.testing.assert_allclose(dense[:, 0].numpy(), 1.0, atol=1e-6)


def test_sparse_views_agree_with_dense() -> None:
    rng = np.random.default_rng(6)
    hw, k, grid = 20, 9, (4, 5)
    weights = rng.uniform(size=(hw, k)) * (rng.uniform(size=(hw, k)) < 0.4)
    weights[np.arange(hw), rng.integers(k, size=hw)] = 0.5
    weights /= weights.sum(1, keepdims=True)
    local = LocalWeights.from_dense(torch.from_numpy(weights.astype(np.float32)), grid)
    assert local.nnz == int((weights > 0).sum())
    np.testing.assert_allclose(local.dense().numpy(), weights, rtol=1e-6)
    assert local.mean_support() == pytest.approx((weights > 0).sum() / hw)

    from_csr = np.zeros((hw, k))
    for x in range(hw):
        lo, hi = local.indptr[x], local.indptr[x + 1]
        from_csr[x, local.components[lo:hi]] = np.exp(local.log_weights[lo:hi])
    np.testing.assert_allclose(from_csr, weights, rtol=1e-6)

    gptr, positions, log_w = local.csc()
    assert len(gptr) == k + 1 and int(gptr[-1]) == local.nnz
    from_csc = np.zeros((hw, k))
    for comp in range(k):
        lo, hi = int(gptr[comp]), int(gptr[comp + 1])
        rows = positions[lo:hi].numpy()
        assert len(set(rows.tolist())) == len(rows)
        from_csc[rows, comp] = np.exp(log_w[lo:hi].numpy())
    np.testing.assert_allclose(from_csc, weights, rtol=1e-6)


def test_neighbourhood_shapes() -> None:
    disk = neighbourhood(1, "disk")
    square = neighbourhood(1, "square")
    assert len(disk) == 5 and set(disk) == {(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)}
    assert len(square) == 9 and set(disk) <= set(square)
    assert len(neighbourhood(2, "disk")) == 13
    assert neighbourhood(0, "disk") == [(0, 0)]
    with pytest.raises(ValueError):
        neighbourhood(1, "hexagon")
