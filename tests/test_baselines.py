"""PaDiM and MahaAD: their math against brute force, and their behaviour on synthetic defects."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from glad.backbones import create_backbone
from glad.baselines import MahaAD, PaDiM
from glad.baselines.mahaad import ledoit_wolf
from glad.baselines.padim import PositionGaussians, embed, mahalanobis, select_channels
from glad.errors import DatasetError, GladError, NotFittedError

DEFECT = (slice(100, 140), slice(150, 190))  # rows, columns of the pasted square


def _texture(seed: int) -> np.ndarray:
    """A stationary random texture: blurred colour noise, the same distribution for every seed."""
    noise = np.random.default_rng(seed).random((256, 256, 3)).astype(np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), 2.0)
    noise = (noise - noise.mean()) / noise.std()
    return np.clip(128 + 40 * noise * np.array([1.0, 0.8, 0.6]), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def backbone():
    return create_backbone("efficientnet_lite0", weights="pretrained")


@pytest.fixture(scope="module")
def train_images():
    return [_texture(seed) for seed in range(12)]


@pytest.fixture(scope="module")
def test_images():
    """Four normal images, one with a white square pasted in, one with a global colour change."""
    normals = [_texture(100 + seed) for seed in range(4)]
    defect = _texture(200)
    defect[DEFECT] = 255
    recoloured = np.clip(_texture(300) * np.array([0.3, 1.0, 1.5]), 0, 255).astype(np.uint8)
    return [*normals, defect, recoloured]


@pytest.fixture(scope="module")
def padim(backbone, train_images):
    # PaDiM's fit inverts 4096 small matrices, one LAPACK call each. On a CPU shared with other
    # jobs, multithreaded LAPACK then waits on descheduled threads at every call (seen here: fit
    # 4-6 s on one thread, 5-115 s on two); one thread keeps this suite's time predictable.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return PaDiM(backbone).fit(train_images)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mahaad(backbone, train_images):
    return MahaAD(backbone).fit(train_images)


# --- PaDiM math --------------------------------------------------------------------------------


def test_position_gaussians_match_numpy_covariance():
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, (5, 23, 4)) * rng.random(4)  # (P, N, d), offset mean
    stats = PositionGaussians(5, 4, torch.device("cpu"))
    for start in range(0, 23, 8):  # uneven batches: 8, 8, 7
        stats.update(torch.from_numpy(data[:, start : start + 8]).float())
    mean, precision = stats.finalize(epsilon=0.01)
    for p in range(5):
        covariance = np.cov(data[p], rowvar=False, ddof=1) + 0.01 * np.eye(4)
        np.testing.assert_allclose(mean[p], data[p].mean(axis=0), rtol=1e-5)
        np.testing.assert_allclose(precision[p], np.linalg.inv(covariance), rtol=1e-4, atol=1e-5)


def test_mahalanobis_matches_brute_force():
    rng = np.random.default_rng(1)
    x, mean = rng.normal(size=(6, 3, 4)), rng.normal(size=(6, 4))
    a = rng.normal(size=(6, 4, 4))
    precision = a @ a.transpose(0, 2, 1) + np.eye(4)
    got = mahalanobis(*(torch.from_numpy(v) for v in (x, mean, precision))).numpy()
    for p in range(6):
        for b in range(3):
            delta = x[p, b] - mean[p]
            assert got[p, b] == pytest.approx(np.sqrt(delta @ precision[p] @ delta))


def test_embed_equals_concatenate_upsample_then_select():
    rng = torch.Generator().manual_seed(0)
    features = [torch.rand(2, c, s, s, generator=rng) for c, s in ((3, 8), (4, 4), (5, 2))]
    channels = torch.from_numpy(select_channels(12, 7, seed=3))
    full = torch.cat([F.interpolate(f, size=(8, 8), mode="nearest") for f in features], dim=1)
    expected = full[:, channels].flatten(2).permute(2, 0, 1)
    assert torch.equal(embed(features, channels, (3, 4, 5)), expected)


def test_channel_subset_is_deterministic_and_capped():
    first = select_channels(176, 100, seed=0)
    assert np.array_equal(first, select_channels(176, 100, seed=0))
    assert not np.array_equal(first, select_channels(176, 100, seed=1))
    assert len(np.unique(first)) == 100 and np.all(np.diff(first) > 0) and first.max() < 176
    assert np.array_equal(select_channels(176, 1000, seed=0), np.arange(176))


# --- PaDiM behaviour ---------------------------------------------------------------------------


def test_padim_ranks_pasted_defect_first_and_localises_it(padim, test_images):
    result = padim.score(test_images[:5])
    assert result.scores.dtype == np.float64 and result.heatmaps.dtype == np.float32
    assert result.heatmaps.shape == (5, 256, 256)
    assert result.scores[4] > 1.3 * result.scores[:4].max()
    row, col = np.unravel_index(result.heatmaps[4].argmax(), (256, 256))
    assert DEFECT[0].start <= row < DEFECT[0].stop and DEFECT[1].start <= col < DEFECT[1].stop
    np.testing.assert_allclose(result.scores, result.heatmaps.max(axis=(1, 2)), rtol=1e-6)


def test_padim_learned_shapes_model_bytes_and_seeded_channels(padim, backbone):
    d, positions = 100, 64 * 64
    assert padim.grid_ == (64, 64)
    assert padim.mean_.shape == (positions, d) and padim.precision_.shape == (positions, d, d)
    assert padim.model_bytes() == positions * d * 4 + positions * d * d * 4 + d * 8
    total = sum(backbone.spec.channels)
    assert np.array_equal(padim.channels_.cpu().numpy(), select_channels(total, 100, seed=0))


# --- MahaAD ------------------------------------------------------------------------------------


def _ledoit_wolf_reference(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit & Wolf (2004), Lemma 3.2-3.4, written out term by term in float64."""
    n, d = x.shape
    centred = x - x.mean(axis=0)
    sample = centred.T @ centred / n
    m = np.trace(sample) / d
    norm2 = lambda a: np.trace(a @ a.T) / d  # noqa: E731 - the paper's normalised Frobenius norm
    delta2 = norm2(sample - m * np.eye(d))
    bbar2 = sum(norm2(np.outer(row, row) - sample) for row in centred) / n**2
    shrinkage = min(bbar2, delta2) / delta2
    return shrinkage * m * np.eye(d) + (1 - shrinkage) * sample, shrinkage


@pytest.mark.parametrize(("n", "d"), [(8, 30), (50, 10), (200, 5)])
def test_ledoit_wolf_matches_reference(n, d):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 5.0
    covariance, shrinkage = ledoit_wolf(x.astype(np.float32))
    expected, expected_shrinkage = _ledoit_wolf_reference(x.astype(np.float32).astype(np.float64))
    assert 0.0 < shrinkage <= 1.0
    assert shrinkage == pytest.approx(expected_shrinkage, rel=1e-9)
    np.testing.assert_allclose(covariance, expected, rtol=1e-9, atol=1e-12)


def test_mahaad_ranks_global_change_first_and_returns_flat_maps(mahaad, test_images):
    result = mahaad.score(test_images)
    assert result.scores[5] > 2.0 * result.scores[:4].max()
    assert result.heatmaps.shape == (6, 256, 256) and result.heatmaps.dtype == np.float32
    np.testing.assert_allclose(result.heatmaps.min(axis=(1, 2)), result.scores, rtol=1e-6)
    np.testing.assert_allclose(result.heatmaps.max(axis=(1, 2)), result.scores, rtol=1e-6)


def test_mahaad_model_bytes(mahaad):
    assert [m.shape for m in mahaad.means_] == [(24,), (40,), (112,)]
    assert mahaad.model_bytes() == sum(8 * (d + d * d) for d in (24, 40, 112))


# --- both --------------------------------------------------------------------------------------


@pytest.mark.parametrize("detector", [PaDiM, MahaAD])
def test_fit_on_too_few_images_raises(detector, backbone, train_images):
    with pytest.raises(DatasetError, match="at least 2"):
        detector(backbone).fit([])
    with pytest.raises(DatasetError):
        detector(backbone).fit(train_images[:1])


@pytest.mark.parametrize("detector", [PaDiM, MahaAD])
def test_use_before_fit_raises(detector, test_images):
    unfitted = detector()  # __init__ only stores parameters: no backbone is built here
    with pytest.raises(NotFittedError, match="not fitted"):
        unfitted.score(test_images[:1])
    with pytest.raises(NotFittedError):
        unfitted.model_bytes()
    assert issubclass(NotFittedError, GladError) and issubclass(NotFittedError, RuntimeError)


@pytest.mark.parametrize("name", ["padim", "mahaad"])
def test_score_on_no_images_is_empty(name, request):
    result = request.getfixturevalue(name).score([])
    assert result.scores.shape == (0,) and result.heatmaps.shape == (0, 256, 256)
