"""Scoring (spec §4) against float64 references written independently of the library."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from glad.local_weights import MAX_TILE, LocalWeights, tile_lengths
from glad.mixture import GaussianMixture
from glad.model import LayerModel
from glad.scoring import (
    choose_method,
    combine_layers,
    fill_invalid_cells,
    heatmaps,
    image_scores,
    layer_costs,
    layer_loglik_dense,
    layer_loglik_sparse,
    loglik_from_costs,
    roi_mask,
)


def random_mixture(rng: np.random.Generator, k: int, d: int) -> GaussianMixture:
    """K random Gaussians with well-conditioned SPD covariances and random weights."""
    means = rng.normal(scale=2.0, size=(k, d))
    a = rng.normal(size=(k, d, d))
    covariances = a @ a.transpose(0, 2, 1) / d + 0.3 * np.eye(d)
    weights = rng.uniform(0.2, 1.0, size=k)
    weights /= weights.sum()
    return GaussianMixture(weights, means, covariances, np.full(k, 10), np.full(k, 3))


def random_local_weights(rng: np.random.Generator, hw: int, k: int) -> torch.Tensor:
    """Dense (HW, K) weights, rows summing to 1, about half the entries exactly zero."""
    weights = rng.uniform(0.05, 1.0, size=(hw, k)) * (rng.uniform(size=(hw, k)) < 0.5)
    weights[np.arange(hw), rng.integers(k, size=hw)] = rng.uniform(0.05, 1.0, size=hw)
    weights /= weights.sum(1, keepdims=True)
    return torch.from_numpy(weights.astype(np.float32))


def reference_loglik(
    features: np.ndarray, mixture: GaussianMixture, weights: np.ndarray
) -> np.ndarray:
    """Naive float64 log sum_k w_k(x) N(u; mu_k, Sigma_k) per (image, position); w (HW, K)."""
    b, hw, d = features.shape
    out = np.empty((b, hw))
    inverses = np.linalg.inv(mixture.covariances)
    logdets = np.linalg.slogdet(mixture.covariances)[1]
    for i in range(b):
        for x in range(hw):
            u = features[i, x].astype(np.float64)
            terms = []
            for k in range(mixture.n_components):
                if weights[x, k] <= 0:
                    continue
                diff = u - mixture.means[k]
                maha = diff @ inverses[k] @ diff
                terms.append(math.log(weights[x, k])
                             - 0.5 * (d * math.log(2 * math.pi) + logdets[k] + maha))
            out[i, x] = logsumexp(terms)
    return out


def features_near(rng: np.random.Generator, mixture: GaussianMixture, b: int, hw: int):
    """Features drawn around the mixture's means (so log-likelihoods are moderate)."""
    comp = rng.integers(mixture.n_components, size=(b, hw))
    noise = rng.normal(scale=1.5, size=(b, hw, mixture.means.shape[1]))
    return torch.from_numpy((mixture.means[comp] + noise).astype(np.float32))


@pytest.mark.parametrize("seed,k,d,grid", [(0, 5, 4, (3, 4)), (1, 7, 6, (2, 5)), (2, 1, 3, (4, 4))])
def test_sparse_equals_dense_and_naive_reference(seed, k, d, grid) -> None:
    rng = np.random.default_rng(seed)
    mixture = random_mixture(rng, k, d)
    factors = mixture.factors()
    hw = grid[0] * grid[1]
    dense = random_local_weights(rng, hw, k)
    local = LocalWeights.from_dense(dense, grid)
    features = features_near(rng, mixture, 3, hw)

    sparse = layer_loglik_sparse(features, factors, local)
    with torch.no_grad():
        dense_out = layer_loglik_dense(features, factors, torch.log(local.dense()))
    reference = reference_loglik(features.numpy(), mixture, local.dense().double().numpy())

    assert sparse.shape == dense_out.shape == (3, hw)
    assert torch.isfinite(sparse).all()
    np.testing.assert_allclose(sparse.numpy(), dense_out.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(sparse.numpy(), reference, rtol=1e-4, atol=2e-3)


def test_dense_with_global_weights_matches_reference() -> None:
    rng = np.random.default_rng(3)
    mixture = random_mixture(rng, 6, 5)
    factors = mixture.factors()
    features = features_near(rng, mixture, 2, 9)
    everywhere = np.repeat(mixture.weights[None], 9, axis=0)
    reference = reference_loglik(features.numpy(), mixture, everywhere)
    for out in (layer_loglik_dense(features, factors, factors.log_weights),
                loglik_from_costs(layer_costs(features, factors), factors.log_weights, 5)):
        np.testing.assert_allclose(out.numpy(), reference, rtol=1e-4, atol=2e-3)


def test_sparse_is_stable_far_from_every_gaussian() -> None:
    """Log-sum-exp must not underflow: exp(-D/2) is 0 in float64 for D ~ 1e4."""
    rng = np.random.default_rng(4)
    mixture = random_mixture(rng, 4, 3)
    factors = mixture.factors()
    grid = (2, 2)
    local = LocalWeights.from_dense(random_local_weights(rng, 4, 4), grid)
    features = torch.full((1, 4, 3), 300.0)
    out = layer_loglik_sparse(features, factors, local)
    reference = reference_loglik(features.numpy(), mixture, local.dense().double().numpy())
    assert torch.isfinite(out).all()
    assert (reference < -1000).all()
    np.testing.assert_allclose(out.numpy(), reference, rtol=1e-4)


def test_dense_is_stable_far_from_every_gaussian() -> None:
    rng = np.random.default_rng(4)
    mixture = random_mixture(rng, 4, 3)
    local = LocalWeights.from_dense(random_local_weights(rng, 4, 4), (2, 2))
    features = torch.full((1, 4, 3), 300.0)
    out = layer_loglik_dense(features, mixture.factors(), local.dense_log())
    reference = reference_loglik(features.numpy(), mixture, local.dense().double().numpy())
    np.testing.assert_allclose(out.numpy(), reference, rtol=1e-4)


# --- batched sparse kernel and dense masked path against a dense float64 reference (§4.1, §4.6) ---


def heterogeneous_weights(rng: np.random.Generator, hw: int, k: int) -> np.ndarray:
    """(HW, K) weights with supports of every size: Gaussian 0 active everywhere, 1 and 2 nowhere,
    the others on log-uniformly many random positions (so tiles of every length, and some longer
    than MAX_TILE when HW allows); rows sum to 1."""
    active = np.zeros((hw, k), dtype=bool)
    active[:, 0] = True
    for comp in range(3, k):
        size = int(np.exp(rng.uniform(0.0, np.log(hw))))
        active[rng.choice(hw, size=size, replace=False), comp] = True
    weights = np.where(active, rng.uniform(0.05, 1.0, size=(hw, k)), 0.0)
    return weights / weights.sum(1, keepdims=True)


def dense_reference(features: np.ndarray, mixture: GaussianMixture,
                    weights: np.ndarray) -> np.ndarray:
    """float64 LSE over all K of log pi_k(x) + log N(u; mu_k, Sigma_k), -inf where pi_k(x) = 0."""
    d = features.shape[-1]
    chol = np.linalg.cholesky(mixture.covariances)
    terms = []
    for k in range(mixture.n_components):
        z = np.linalg.solve(chol[k], (features.astype(np.float64) - mixture.means[k]).reshape(-1, d).T)
        logdet = 2.0 * np.log(np.diag(chol[k])).sum()
        terms.append(-0.5 * (d * math.log(2 * math.pi) + logdet + (z * z).sum(0)))
    log_density = np.stack(terms, -1).reshape(*features.shape[:2], -1)
    with np.errstate(divide="ignore"):
        return logsumexp(np.log(weights)[None] + log_density, axis=-1)


@pytest.mark.parametrize("d,k,grid", [(3, 12, (5, 7)), (24, 40, (20, 20)), (40, 30, (16, 18))])
@pytest.mark.parametrize("batch", [1, 5])
def test_sparse_and_dense_masked_match_dense_reference(d, k, grid, batch) -> None:
    rng = np.random.default_rng(d * 100 + batch)
    mixture = random_mixture(rng, k, d)
    factors = mixture.factors()
    hw = grid[0] * grid[1]
    weights = heterogeneous_weights(rng, hw, k)
    local = LocalWeights.from_dense(torch.from_numpy(weights.astype(np.float32)), grid)
    features = features_near(rng, mixture, batch, hw)
    reference = dense_reference(features.numpy(), mixture, local.dense().double().numpy())

    sparse = layer_loglik_sparse(features, factors, local)
    dense = layer_loglik_dense(features, factors, local.dense_log())
    costs = layer_costs(features, factors)  # once, then read under any weighting
    assert costs.shape == (batch, hw, k)
    from_costs = loglik_from_costs(costs, local, d)
    for out in (sparse, dense, from_costs):
        assert out.shape == (batch, hw) and out.dtype == torch.float32
        np.testing.assert_allclose(out.numpy(), reference, rtol=1e-4, atol=1e-4)


def test_tiles_hold_every_active_pair_once() -> None:
    rng = np.random.default_rng(8)
    hw, k = 600, 20
    weights = heterogeneous_weights(rng, hw, k)
    local = LocalWeights.from_dense(torch.from_numpy(weights.astype(np.float32)), (20, 30))
    tiles = local.tiles()
    assert tiles.slots.shape == (int((weights > 0).sum(1).max()), hw)
    assert {b.tile for b in tiles.buckets} <= set(tile_lengths().tolist())
    assert max(b.tile for b in tiles.buckets) == MAX_TILE  # Gaussian 0 spans several full tiles
    comp = torch.cat([b.components.repeat_interleave(b.tile) for b in tiles.buckets])
    position = torch.cat([b.positions for b in tiles.buckets])
    log_w = torch.cat([b.log_weights.flatten() for b in tiles.buckets])
    assert len(comp) == tiles.n_slots
    found = np.zeros((hw, k))
    for row in range(tiles.slots.shape[0]):
        slot = tiles.slots[row]
        used = slot < tiles.n_slots
        assert (position[slot[used]] == torch.nonzero(used).flatten()).all()
        found[position[slot[used]].numpy(), comp[slot[used]].numpy()] += np.exp(
            log_w[slot[used]].numpy())
    np.testing.assert_allclose(found, weights, rtol=1e-6)  # each pair once, with its weight
    assert local.tiles() is tiles  # built once per device


def test_small_chunks_give_the_same_result() -> None:
    rng = np.random.default_rng(9)
    mixture = random_mixture(rng, 10, 6)
    local = LocalWeights.from_dense(torch.from_numpy(heterogeneous_weights(rng, 300, 10)
                                                     .astype(np.float32)), (15, 20))
    features = features_near(rng, mixture, 3, 300)
    factors = mixture.factors()
    for method, log_weights in ((layer_loglik_sparse, local), (layer_loglik_dense,
                                                                local.dense_log())):
        whole = method(features, factors, log_weights, budget=1 << 30)
        chunked = method(features, factors, log_weights, budget=1)
        np.testing.assert_allclose(chunked.numpy(), whole.numpy(), rtol=1e-6, atol=1e-5)


def test_position_without_active_gaussian_is_minus_infinity() -> None:
    rng = np.random.default_rng(10)
    mixture = random_mixture(rng, 3, 2)
    weights = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.2, 0.8]])
    local = LocalWeights.from_dense(weights, (1, 3))
    features = features_near(rng, mixture, 2, 3)
    for out in (layer_loglik_sparse(features, mixture.factors(), local),
                layer_loglik_dense(features, mixture.factors(), local.dense_log()),
                loglik_from_costs(layer_costs(features, mixture.factors()), local, 2)):
        assert torch.isneginf(out[:, 1]).all() and torch.isfinite(out[:, [0, 2]]).all()


def test_layer_model_methods_agree_and_mask_invalid() -> None:
    rng = np.random.default_rng(11)
    mixture = random_mixture(rng, 8, 5)
    grid = (4, 6)
    local = LocalWeights.from_dense(torch.from_numpy(heterogeneous_weights(rng, 24, 8)
                                                     .astype(np.float32)), grid)
    layer = LayerModel(mixture, mixture.factors(), grid, local)
    features = features_near(rng, mixture, 2, 24)
    valid = torch.from_numpy(rng.uniform(size=(2, 24)) < 0.8)
    maps = {m: layer.loglik(features, valid, method=m) for m in ("auto", "sparse", "dense")}
    for out in maps.values():
        assert out.shape == (2, *grid)
        assert torch.isnan(out).flatten(1).equal(~valid)
    np.testing.assert_allclose(maps["dense"].numpy(), maps["sparse"].numpy(), rtol=1e-5)
    np.testing.assert_array_equal(maps["auto"].numpy(), maps["sparse"].numpy())  # CPU: sparse
    with pytest.raises(ValueError):
        layer.loglik(features, method="fast")


def test_auto_method_is_sparse_on_cpu_and_dense_on_cuda() -> None:
    assert choose_method("auto", torch.device("cpu")) == "sparse"
    assert choose_method("auto", torch.device("cuda")) == "dense"
    assert choose_method("sparse", torch.device("cuda")) == "sparse"


def test_image_scores_is_minus_linear_quantile_over_roi() -> None:
    rng = np.random.default_rng(5)
    loglik = rng.normal(size=(3, 32, 32)) * 10.0
    loglik[1, 3, 4] = np.nan  # an invalid pixel inside the ROI is ignored
    roi = rng.uniform(size=(32, 32)) < 0.6
    roi[3, 4] = True
    for q in (0.0, 0.005, 0.1, 0.5):
        scores = image_scores(torch.from_numpy(loglik.astype(np.float32)),
                              torch.from_numpy(roi), q)
        single = loglik.astype(np.float32).astype(np.float64)
        expected = [-np.quantile(single[i][roi & np.isfinite(single[i])], q, method="linear")
                    for i in range(3)]
        np.testing.assert_allclose(scores, expected, rtol=1e-12, atol=1e-9)


def test_image_scores_ignores_pixels_outside_roi() -> None:
    loglik = torch.zeros(1, 16, 16)
    loglik[0, 0, 0] = -1e6  # very anomalous, but outside the ROI
    roi = torch.ones(16, 16, dtype=torch.bool)
    roi[0, 0] = False
    assert image_scores(loglik, roi, 0.0)[0] == pytest.approx(0.0)
    roi[0, 0] = True
    assert image_scores(loglik, roi, 0.0)[0] == pytest.approx(1e6)


def test_heatmaps_inside_roi_and_floor_outside() -> None:
    rng = np.random.default_rng(6)
    loglik = torch.from_numpy(rng.normal(size=(2, 24, 24)).astype(np.float32))
    roi = roi_mask("margin", 24)
    assert roi.sum() < 24 * 24
    heat = heatmaps(loglik, roi)
    assert heat.shape == (2, 24, 24) and heat.dtype == np.float32
    inside = roi.numpy()
    for i in range(2):
        expected_inside = -loglik[i].numpy()[inside]
        np.testing.assert_allclose(heat[i][inside], expected_inside)
        np.testing.assert_array_equal(heat[i][~inside], expected_inside.min())


def test_roi_mask_margin_is_one_sixteenth() -> None:
    roi = roi_mask("margin", 256).numpy()
    rows = np.flatnonzero(roi.any(1))
    cols = np.flatnonzero(roi.any(0))
    assert (rows[0], rows[-1], cols[0], cols[-1]) == (16, 239, 16, 239)
    assert roi[16:240, 16:240].all()
    assert roi_mask("full", 8).all()
    with pytest.raises(ValueError):
        roi_mask("nope", 8)


def bilinear_reference(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling with half-pixel centres (align_corners=False), float64, by hand."""
    h, w = image.shape

    def taps(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = (np.arange(size) + 0.5) * n_in / size - 0.5
        src = np.maximum(src, 0.0)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    y0, y1, fy = taps(h)
    x0, x1, fx = taps(w)
    top = image[y0][:, x0] * (1 - fx) + image[y0][:, x1] * fx
    bottom = image[y1][:, x0] * (1 - fx) + image[y1][:, x1] * fx
    return top * (1 - fy[:, None]) + bottom * fy[:, None]


def test_combine_layers_is_sum_of_bilinear_upsamplings() -> None:
    rng = np.random.default_rng(7)
    maps = [rng.normal(size=(2, s, s)) * 50 for s in (16, 8, 4)]
    total = combine_layers([torch.from_numpy(m.astype(np.float32)) for m in maps], 64)
    assert total.shape == (2, 64, 64)
    expected = np.stack([sum(bilinear_reference(m[i], 64) for m in maps) for i in range(2)])
    np.testing.assert_allclose(total.numpy(), expected, rtol=1e-5, atol=1e-3)


def test_combine_layers_of_constants_is_constant_sum() -> None:
    layers = [torch.full((1, 5, 5), -3.0), torch.full((1, 2, 2), -7.5)]
    total = combine_layers(layers, 20)
    assert total.shape == (1, 20, 20)
    np.testing.assert_allclose(total.numpy(), -10.5, rtol=1e-6)


def test_invalid_cells_take_their_most_normal_valid_neighbour() -> None:
    grid = torch.arange(25.0).view(1, 5, 5)
    grid[0, 0, :] = math.nan  # a border ring, as erosion leaves it on a registered frame
    grid[0, :, 0] = math.nan
    filled = fill_invalid_cells(grid)
    assert torch.isfinite(filled).all()
    np.testing.assert_array_equal(filled[0, 1:, 1:].numpy(), grid[0, 1:, 1:].numpy())
    assert filled[0, 0, 2].item() == pytest.approx(8.0)  # the highest of 6, 7, 8 below it
    assert filled[0, 0, 0].item() == pytest.approx(6.0)  # reached through its diagonal
    nothing_valid = torch.full((1, 3, 3), math.nan)
    assert torch.isnan(fill_invalid_cells(nothing_valid)).all()


def test_filled_coarse_cells_let_every_pixel_show_every_layer() -> None:
    fine = torch.zeros(1, 16, 16)
    coarse = torch.full((1, 4, 4), -5.0)
    coarse[0, 0, :] = math.nan  # the coarse layer's top row reaches out of the frame
    assert torch.isnan(combine_layers([fine, coarse], 16)[0, :4]).all()
    total = combine_layers([fine, fill_invalid_cells(coarse)], 16)
    np.testing.assert_allclose(total.numpy(), -5.0, rtol=1e-6)
