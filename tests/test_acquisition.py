"""Acquisition noise (`glad.acquisition`): a JPEG copy of a normal part scores as the part does,
and the noise the fit measured travels with the model file and through online updates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from glad.acquisition import jpeg_noise
from glad.backbones import create_backbone
from glad.errors import ModelFileError
from glad.features import layer_features
from glad.images import jpeg_round_trip
from glad.mixture import noise_floored
from glad.model import GladModel
from glad.online_kmle import OnlineGlad


def dark_part(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A textured disc on a near-black background with faint sensor noise: the background's
    features barely vary between images, as a real bottle category's do."""
    image = np.clip(rng.normal(3.0, 1.0, (size, size, 1)), 0, 255).repeat(3, axis=2)
    rows, cols = np.mgrid[:size, :size]
    disc = (rows - size // 2) ** 2 + (cols - size // 2) ** 2 < (size * 0.27) ** 2
    texture = rng.normal(140, 25, (size // 8, size // 8, 3)).repeat(8, axis=0).repeat(8, axis=1)
    image[disc] = texture[disc]
    return image.astype(np.uint8)


@pytest.fixture(scope="module")
def parts() -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    return {"train": [dark_part(rng) for _ in range(12)], "test": [dark_part(rng) for _ in range(4)]}


def fit(parts: dict, quality: int) -> GladModel:
    return GladModel(jpeg_noise=quality, max_components=8, max_iter=8, radius=1,
                     align=False).fit(parts["train"])


@pytest.fixture(scope="module")
def noisy(parts) -> GladModel:
    return fit(parts, GladModel.jpeg_noise)  # the default


def test_jpeg_copies_of_normal_parts_score_as_their_originals(parts, noisy: GladModel) -> None:
    """Without the floor, Gaussians of the flat background are far narrower than a JPEG round
    trip moves its features, and every re-encoded normal part is flagged; with it, the copies
    score within a few percent of the originals."""
    copies = [jpeg_round_trip(image, 90) for image in parts["test"]]
    bare = fit(parts, 0)
    assert all(layer.mixture.noise is None for layer in bare.layers_)
    assert bare.decide(bare.score(copies).scores).all()
    assert (bare.score(copies).scores / bare.score(parts["test"]).scores).min() > 1.3
    ratio = noisy.score(copies).scores / noisy.score(parts["test"]).scores
    assert ratio.max() < 1.15


def test_jpeg_noise_is_a_covariance_that_grows_as_quality_drops(parts) -> None:
    backbone = create_backbone("efficientnet_lite0")
    images = parts["train"][:4]
    features = layer_features(backbone, images, 4, False, "")
    valid = [torch.ones(len(images), f.shape[1] * f.shape[2], dtype=torch.bool) for f in features]
    among = np.arange(len(images))
    fine, coarse = (jpeg_noise(backbone, images, features, valid, among, q, 4) for q in (95, 50))
    for f, a, b in zip(features, fine, coarse, strict=True):
        assert a.shape == (f.shape[-1],) * 2
        np.testing.assert_allclose(a, a.T, atol=1e-9 * np.trace(a))
        assert np.linalg.eigvalsh(a).min() > -1e-9 * np.trace(a)
        assert 0 < np.trace(a) < np.trace(b)
    with pytest.raises(ValueError, match="quality"):
        jpeg_noise(backbone, images, features, valid, among, 0, 4)


def test_the_noise_travels_with_the_model_and_through_online_updates(parts, noisy: GladModel,
                                                                     tmp_path: Path) -> None:
    """Every covariance is floored by the measured noise: after save and load, and for the
    Gaussians an online update refreshes from their statistics."""
    loaded = GladModel.load(noisy.save(tmp_path / "noisy"))
    assert loaded.jpeg_noise == noisy.jpeg_noise == 95
    for fitted, back in zip(noisy.layers_, loaded.layers_, strict=True):
        np.testing.assert_array_equal(back.mixture.noise, fitted.mixture.noise)
    online = OnlineGlad(loaded)
    registered, valid, _ = loaded.register(parts["test"])
    features = loaded.backbone_.extract(np.stack(registered))
    online.learn(features, valid)
    for layer in online.model().layers_:
        stats, noise = layer.mixture.stats, layer.mixture.noise
        np.testing.assert_allclose(layer.mixture.covariances,
                                   noise_floored(stats.covariances(loaded.oas_formula), noise),
                                   rtol=1e-6, atol=1e-9)


def test_the_floor_raises_narrow_directions_to_the_noise_and_leaves_wide_ones() -> None:
    rng = np.random.default_rng(0)
    d = 6
    root = rng.normal(size=(d, d))
    noise = root @ root.T / d + 0.1 * np.eye(d)
    narrow = np.diag([1e-4] * 3 + [50.0] * 3)[None]  # flat in half of its directions
    wide = 3.0 * noise[None]
    floored = noise_floored(np.concatenate([narrow, wide]), noise)
    for before, after in zip(np.concatenate([narrow, wide]), floored, strict=True):
        assert np.linalg.eigvalsh(after - noise).min() > -1e-6  # at least the noise
        assert np.linalg.eigvalsh(after - before).min() > -1e-6  # never narrower than it was
    np.testing.assert_allclose(floored[1], wide[0], rtol=1e-5)  # wide enough: unchanged
    assert np.linalg.slogdet(floored[0])[1] > np.linalg.slogdet(narrow[0])[1] + 10


def test_a_model_file_whose_noise_is_not_a_covariance_is_refused(noisy: GladModel,
                                                                 tmp_path: Path) -> None:
    from test_integrity import tampered

    def skew(arrays: dict) -> None:
        noise = arrays["layer0.noise"]
        arrays["layer0.noise"] = noise + np.triu(np.ones_like(noise), 1)

    saved = noisy.save(tmp_path / "noisy")
    with pytest.raises(ModelFileError, match="acquisition noise of layer 1"):
        GladModel.load(tampered(saved, tmp_path, edit_arrays=skew))
