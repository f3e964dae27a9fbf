"""GladModel end to end on the tiny synthetic "nut": fit, score, decide, save/load and its checks.

One small model is fitted per module (a few seconds on one CPU thread); tests only read it.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import glad.errors
import glad.layer_fit
import glad.mixture
import glad.model
import glad.selection
from glad.backbones import create_backbone
from glad.datasets import MVTecCategory, image_folder
from glad.errors import DatasetError, GladError, ModelFileError, ModelMismatchError
from glad.features import iter_features, layer_validity
from glad.images import read_image
from glad.metrics import image_auroc
from glad.model import GladModel
from glad.modelfile import ARRAYS, MANIFEST
from glad.scoring import combine_layers, image_scores
from glad.validation import Validation

SETTINGS = dict(max_components=16, max_iter=10)


@pytest.fixture(scope="module")
def nut(tiny_dataset: Path) -> MVTecCategory:
    return MVTecCategory(tiny_dataset / "nut")


@pytest.fixture(scope="module")
def fitted(nut: MVTecCategory) -> GladModel:
    model = GladModel(**SETTINGS)
    train = [read_image(p) for p in nut.train_paths()]
    returned = model.fit(train)
    assert returned is model
    return model


@pytest.fixture(scope="module")
def test_set(nut: MVTecCategory):
    items = nut.test_items()
    return [read_image(item.path) for item in items], np.array([item.label for item in items])


@pytest.fixture(scope="module")
def scored(fitted: GladModel, test_set):
    images, _ = test_set
    return fitted.score(images)


@pytest.fixture(scope="module")
def saved(fitted: GladModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "nut"
    assert fitted.save(path) == path
    return path


def copy_of(saved: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(saved, target)
    return target


def test_fit_sets_learned_attributes(fitted: GladModel) -> None:
    fresh = GladModel(**SETTINGS)
    assert not [name for name in vars(fresh) if name.endswith("_")]
    learned = {name for name in vars(fitted) if name.endswith("_") and not name.startswith("_")}
    assert {"layers_", "threshold_", "radius_", "backbone_", "roi_", "n_train_images_",
            "fit_seconds_"} <= learned
    assert fitted.n_train_images_ == 16
    assert fitted.fit_seconds_ > 0
    assert np.isfinite(fitted.threshold_)
    assert len(fitted.layers_) == 3
    for layer in fitted.layers_:
        assert 1 <= layer.mixture.n_components <= SETTINGS["max_components"]
        assert layer.mixture.weights.sum() == pytest.approx(1.0)
    # constructor parameters are stored as given (scikit-learn convention)
    assert fitted.max_components == 16 and fitted.max_iter == 10


def test_defective_images_score_higher(scored, test_set) -> None:
    _, labels = test_set
    assert scored.scores.shape == (len(labels),) and np.isfinite(scored.scores).all()
    assert labels.sum() and (1 - labels).sum()
    assert scored.scores[labels == 1].mean() > scored.scores[labels == 0].mean()
    assert image_auroc(labels, scored.scores) >= 0.75


def test_heatmaps_shape(scored, test_set) -> None:
    images, _ = test_set
    assert scored.heatmaps.shape == (len(images), 256, 256)
    assert scored.heatmaps.dtype == np.float32
    assert np.isfinite(scored.heatmaps).all()
    assert len(scored) == len(images)


def test_heat_maps_show_the_pixels_under_invalid_coarse_cells(fitted: GladModel, test_set) -> None:
    """A band of invalid pixels (out of the registered frame) invalidates the coarse layers'
    cells around it; the valid pixels under those cells still get a heat value from every
    layer, while the image score leaves them out and the invalid pixels stay at the floor."""
    registered, valid, _ = fitted.register(test_set[0][:2])
    valid = valid.copy()
    valid[:, 120:136] = False
    features = next(iter_features(fitted.backbone_, registered, 2))
    scores, maps = fitted.score_features(features, valid)
    floor = maps.reshape(2, -1).min(1)[:, None, None]
    assert np.all(maps[:, 120:136] == floor)
    roi = fitted.roi_.numpy()
    near = np.zeros_like(roi)
    near[96:120], near[136:160] = True, True  # valid, under the deepest layer's invalid cells
    assert (near & roi).sum() > 500
    assert (maps[:, near & roi] > floor[:, :, 0]).mean() > 0.95
    logliks = fitted.layer_logliks(features, layer_validity(valid, [f.shape[2:] for f in features]))
    assert all(torch.isnan(x).any() for x in logliks[1:])  # the holes the heat maps filled
    total = combine_layers(logliks, maps.shape[-1])
    roi_valid = fitted.roi_ & torch.from_numpy(valid)
    np.testing.assert_allclose(scores, image_scores(total, roi_valid, fitted.quantile))


def test_score_accepts_any_image_size(fitted: GladModel, test_set) -> None:
    image = test_set[0][0]
    big = np.kron(image, np.ones((2, 2, 1), dtype=np.uint8))  # 512x512, same content
    result = fitted.score([big])
    assert result.heatmaps.shape == (1, 256, 256) and np.isfinite(result.scores).all()
    assert len(fitted.score([])) == 0


def test_other_product_scores_as_anomalous(fitted: GladModel, scored, test_set,
                                           tiny_dataset: Path) -> None:
    """Weave texture images are nothing like a nut: every one scores above the good nuts."""
    weave = [read_image(p) for p in image_folder(tiny_dataset / "weave" / "test" / "good")]
    foreign = fitted.score(weave).scores
    _, labels = test_set
    assert foreign.min() > scored.scores[labels == 0].max()
    assert fitted.decide(foreign).all()


def test_decide_uses_the_threshold(fitted: GladModel, scored) -> None:
    decisions = fitted.decide(scored.scores)
    np.testing.assert_array_equal(decisions, scored.scores > fitted.threshold_)
    assert fitted.decide(np.array([fitted.threshold_ - 1, fitted.threshold_ + 1])).tolist() == [
        False, True]


def test_model_bytes(fitted: GladModel) -> None:
    size = fitted.model_bytes()
    assert size > 0
    whiteners = sum(4 * layer.mixture.n_components * layer.mixture.means.shape[1] ** 2
                    for layer in fitted.layers_)
    assert size >= whiteners


def test_save_load_round_trip(fitted: GladModel, saved: Path, scored, test_set) -> None:
    assert (saved / MANIFEST).is_file() and (saved / ARRAYS).is_file()
    loaded = GladModel.load(saved)
    assert loaded.threshold_ == fitted.threshold_
    assert loaded.radius_ == fitted.radius_
    assert [layer.mixture.n_components for layer in loaded.layers_] == [
        layer.mixture.n_components for layer in fitted.layers_]
    images, _ = test_set
    again = loaded.score(images[:4])
    np.testing.assert_allclose(again.scores, scored.scores[:4], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(again.heatmaps, scored.heatmaps[:4], rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(loaded.decide(again.scores), fitted.decide(scored.scores[:4]))
    assert loaded.model_bytes() == fitted.model_bytes()


def test_load_with_the_same_built_backbone(fitted: GladModel, saved: Path) -> None:
    loaded = GladModel.load(saved, backbone=fitted.backbone_)
    assert loaded.backbone_ is fitted.backbone_


def test_load_with_other_backbone_name_is_refused(saved: Path) -> None:
    with pytest.raises(ModelMismatchError):
        GladModel.load(saved, backbone="resnet18")


def test_load_with_other_preprocessing_is_refused(saved: Path) -> None:
    other = create_backbone("efficientnet_lite0", "random", input_size=128)
    with pytest.raises(ModelMismatchError):
        GladModel.load(saved, backbone=other)


def test_tampered_arrays_fail_the_hash_check(saved: Path, tmp_path: Path) -> None:
    model = copy_of(saved, tmp_path)
    data = bytearray((model / ARRAYS).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (model / ARRAYS).write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="hash"):
        GladModel.load(model)


def test_missing_arrays_file(saved: Path, tmp_path: Path) -> None:
    model = copy_of(saved, tmp_path)
    (model / ARRAYS).unlink()
    with pytest.raises(ModelFileError):
        GladModel.load(model)


def test_unknown_schema_version(saved: Path, tmp_path: Path) -> None:
    model = copy_of(saved, tmp_path)
    manifest = json.loads((model / MANIFEST).read_text())
    manifest["schema_version"] = 999
    (model / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelFileError, match="999"):
        GladModel.load(model)


def test_corrupt_or_foreign_manifest(saved: Path, tmp_path: Path) -> None:
    model = copy_of(saved, tmp_path)
    (model / MANIFEST).write_text("{not json")
    with pytest.raises(ModelFileError):
        GladModel.load(model)
    (model / MANIFEST).write_text(json.dumps({"schema": "something-else", "schema_version": 1}))
    with pytest.raises(ModelFileError):
        GladModel.load(model)


def test_missing_model_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError):
        GladModel.load(tmp_path / "no-such-model")
    with pytest.raises(ModelFileError):
        GladModel.load(tmp_path)  # exists, but is not a model directory


def test_use_before_fit() -> None:
    model = GladModel()
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    with pytest.raises(glad.model.NotFittedError):
        model.score([image])
    with pytest.raises(glad.model.NotFittedError):
        model.model_bytes()
    with pytest.raises(glad.model.NotFittedError):
        model.decide(np.zeros(1))
    with pytest.raises(glad.model.NotFittedError):
        model.save("unused")
    assert issubclass(glad.model.NotFittedError, GladError)
    assert glad.model.NotFittedError is glad.errors.NotFittedError  # one class, not two


def test_fit_needs_images() -> None:
    with pytest.raises(DatasetError):
        GladModel().fit([])
    with pytest.raises(DatasetError):
        GladModel().fit([np.zeros((64, 64, 3), dtype=np.uint8)])


def test_a_frame_that_cannot_be_aligned_is_reported_not_scored(fitted: GladModel) -> None:
    blank = np.full((256, 256, 3), 128, dtype=np.uint8)
    result = fitted.score([blank])
    assert result.status[0].startswith("alignment_failed")
    assert np.isinf(result.scores[0]) and fitted.decide(result.scores)[0]


def test_auto_alignment_turns_itself_off_when_poses_vary_beyond_the_gates() -> None:
    """Parts swinging on a hook (MPDD metal plate) rotate far past the 20° gate: with
    align="auto" the model is fitted without alignment instead of dropping most images."""
    import cv2

    from glad.synth import render_normal

    rng = np.random.default_rng(0)
    images = []
    for seed in range(10):
        part = render_normal("nut", np.random.default_rng(seed))
        turn = cv2.getRotationMatrix2D((127.5, 127.5), float(rng.uniform(-90, 90)), 1.0)
        images.append(cv2.warpAffine(part, turn, (256, 256), borderMode=cv2.BORDER_REPLICATE))
    model = GladModel(**SETTINGS).fit(images)
    assert model.reference_ is None and model.aligner_ is None
    assert model.n_train_images_ == len(images)
    assert model.score(images[:2]).status == ["ok", "ok"]


def _round_part(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A round part with concentric rings and grains strewn at random (a biscuit, a washer):
    the same at every angle, with nothing that tells one angle from another."""
    centre = size / 2 + rng.normal(0, 1.5, 2)
    rows, cols = np.mgrid[:size, :size].astype(float)
    radius = np.hypot(rows - centre[0], cols - centre[1])
    grey = np.full((size, size), 45.0)
    grey[radius < 92] = (150 + 25 * np.cos(radius / 3.0))[radius < 92]
    grey[(radius >= 92) & (radius < 98)] = 95
    for angle, distance in zip(rng.uniform(0, 2 * np.pi, 12), rng.uniform(10, 85, 12), strict=True):
        grain = np.hypot(rows - centre[0] - distance * np.sin(angle),
                         cols - centre[1] - distance * np.cos(angle)) < 2.5
        grey[grain] = 210
    grey += rng.normal(0, 3, grey.shape)
    return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def test_auto_alignment_is_given_up_on_a_rotation_symmetric_part(caplog) -> None:
    """Registered on the reference, a few such parts come out turned by 180° and fail the gates:
    each would be flagged at test time, more often than the false-alarm budget (0.005), so the
    model does not align even though most frames align (the former rule kept alignment up to
    10 % of failures; forced alignment flagged 2 of 30 normal parts and scored AUROC 0.93
    against 1.00 in an ad-hoc check)."""
    rng = np.random.default_rng(0)
    images = [_round_part(rng) for _ in range(24)]
    with caplog.at_level("WARNING", logger="glad.registration"):
        model = GladModel(**SETTINGS).fit(images)
    assert model.reference_ is None and model.aligner_ is None
    assert model.n_train_images_ == len(images)
    reports = [found for record in caplog.records if (found := re.search(
        r"(\d+) of (\d+) training images failed alignment", record.getMessage()))]
    failed, total = map(int, reports[0].groups())
    assert total == len(images) and 0 < failed <= 0.1 * total


def test_layer_validity_follows_the_pixel_mask_per_stride() -> None:
    from glad.features import layer_validity

    valid = np.ones((1, 256, 256), dtype=bool)
    valid[0, :, :64] = False  # the left quarter came from outside the frame
    layers = layer_validity(valid, [(64, 64), (32, 32), (16, 16)])
    assert [tuple(v.shape) for v in layers] == [(1, 4096), (1, 1024), (1, 256)]
    for v, (h, w) in zip(layers, [(64, 64), (32, 32), (16, 16)], strict=True):
        grid = v.reshape(h, w).numpy()
        first_valid = w // 4 + 1  # the invalid quarter plus the one-cell erosion
        assert not grid[:, :first_valid].any() and grid[:, first_valid:].all()


def test_covered_cells_need_min_images_valid_images() -> None:
    from glad.features import covered_cells

    valid = torch.ones(10, 6, dtype=torch.bool)
    valid[2:, 0] = False  # valid in 2 of 10 images
    valid[3:, 1] = False  # in 3 of 10
    valid[:, 2] = False  # in none
    covered = covered_cells([valid], 3)[0]
    assert covered.tolist() == [False, True, False, True, True, True]
    few = covered_cells([valid[:2]], 3)[0]  # fewer images than min_images: valid in all of them
    assert few.tolist() == valid[:2].all(0).tolist()


def test_uncovered_cells_are_not_scored_and_travel_with_the_model(fitted: GladModel, test_set,
                                                                  tmp_path: Path) -> None:
    """Cells the training frames rarely covered (`LayerModel.covered`) score NaN like invalid
    ones: image scores leave them out, heat maps show their neighbours; saved and loaded."""
    from dataclasses import replace

    assert any(layer.covered is not None for layer in fitted.layers_)  # the nut moves
    deepest = fitted.layers_[-1]
    hole = torch.ones(deepest.grid[0] * deepest.grid[1], dtype=torch.bool)
    hole[: deepest.grid[1]] = False  # the top row
    model = copy.copy(fitted)
    model.layers_ = [*fitted.layers_[:-1], replace(deepest, covered=hole)]
    images, _ = test_set
    aligned, valid, _ = model.register(images[:3])
    features = model.backbone_.extract(np.stack(aligned))
    logliks = model.layer_logliks(features, layer_validity(valid, [f.shape[2:] for f in features]))
    assert torch.isnan(logliks[-1][:, 0]).all() and torch.isfinite(logliks[-1][:, 4:12, 4:12]).all()
    result = model.score(images[:3])
    roi = model.roi_.numpy() & valid
    assert np.isfinite(result.scores).all() and np.isfinite(result.heatmaps[roi]).all()
    loaded = GladModel.load(model.save(tmp_path / "holed"))
    assert torch.equal(loaded.layers_[-1].covered, hole)
    np.testing.assert_allclose(loaded.score(images[:3]).scores, result.scores, rtol=1e-5)


def test_polygon_roi_is_rasterised_in_reference_pixels(nut: MVTecCategory) -> None:
    images = [read_image(p) for p in nut.train_paths()[:6]]
    square = [(64, 64), (192, 64), (192, 192), (64, 192)]
    model = GladModel(max_components=8, max_iter=3, radius=1, roi=square).fit(images)
    roi = model.roi_.numpy()
    assert roi[128, 128] and not roi[10, 10] and not roi[128, 250]
    assert abs(roi.mean() - (129 * 129) / 256**2) < 0.01


def test_threshold_is_calibrated_and_validated_on_held_back_images(fitted: GladModel, nut,
                                                                    saved: Path) -> None:
    """The threshold comes from the held-back normals' scores at the default false-alarm rate;
    the fit reports the canaries' AUROC and recall at it, and the selection table marks one
    candidate; all of it survives save and load."""
    train = [read_image(p) for p in nut.train_paths()]
    held = glad.selection.holdout_indices(len(train), fitted.holdout, fitted.seed)
    calibration, validation = fitted.calibration_, fitted.validation_
    assert calibration.far == fitted.far == 0.005 and calibration.n_scores == len(held)
    assert calibration.threshold == fitted.threshold_
    assert validation.n_normals == len(held) and 0 < validation.n_canaries <= len(held)
    assert validation.canary_auroc is not None and 0.0 <= validation.recall <= 1.0
    assert fitted.threshold_ > validation.normal_median
    chosen = [name for name, row in fitted.selection_.items() if row["chosen"]]
    assert chosen == [glad.selection.radius_name(fitted.radius_)]
    assert all(row["canary_auroc"] is not None for row in fitted.selection_.values())
    loaded = GladModel.load(saved)
    assert loaded.calibration_ == calibration and loaded.validation_ == validation
    assert loaded.selection_ == json.loads(json.dumps(fitted.selection_))
    manifest = json.loads((saved / MANIFEST).read_text())
    assert manifest["validation"]["recall"] == validation.recall


def test_alignment_is_judged_against_the_images_as_they_are(fitted: GladModel) -> None:
    """The nut is aligned by default; the fit also scored its held-back images and canaries
    without alignment (same mixtures) and kept alignment because it explains them better."""
    rows = fitted.selection_
    assert fitted.reference_ is not None
    assert {"r=1", "global", "unaligned r=1", "unaligned global"} <= set(rows)
    aligned_best = min(row["normal_mean"] for name, row in rows.items() if "unaligned" not in name)
    plain_best = min(row["normal_mean"] for name, row in rows.items() if "unaligned" in name)
    assert aligned_best < plain_best
    assert not any(row["chosen"] for name, row in rows.items() if "unaligned" in name)


def _localisation(auroc: float, normal_mean: float, prefix: str,
                  jitter: float = 0.0) -> glad.selection.Localisation:
    """Held-back normals at `normal_mean`, alternately `jitter` above and below it."""
    normal = normal_mean + jitter * np.array([1.0, -1.0] * 4)
    validation = Validation(auroc, None, None, normal_mean, 1.0, normal_mean, normal_mean + 5,
                            8, 8)
    return glad.selection.Localisation([], [], None, 1, normal, np.zeros(8),
                                       {prefix + "r=1": {"chosen": True}}, validation, covered=[])


@pytest.mark.parametrize(("aligned", "plain", "keep"), [
    ((1.0, 400.0), (1.0, 450.0), True),  # better explained, as separable: kept
    ((1.0, 460.0), (1.0, 450.0), False),  # normals less well explained: dropped
    ((0.80, 400.0), (0.99, 450.0), False),  # canaries less separable beyond the error: dropped
    ((0.97, 400.0), (0.98, 450.0), True),  # within the canary AUROC's error: kept
    ((1.0, 450.03, 3.0), (1.0, 450.0), True),  # a part that barely moves: the same normals
    ((1.0, 452.0, 3.0), (1.0, 450.0), False),  # worse beyond the error of their difference
])
def test_alignment_is_dropped_when_it_hurts_on_held_back_images(fitted: GladModel, aligned,
                                                                plain, keep: bool) -> None:
    model = copy.copy(fitted)
    chosen = model._keep_alignment_or_not(_localisation(*aligned[:2], "", *aligned[2:]),
                                          _localisation(*plain, "unaligned "))
    assert (model.reference_ is not None) == keep and (model.aligner_ is not None) == keep
    assert chosen.selection["r=1"]["chosen"] == keep
    assert chosen.selection["unaligned r=1"]["chosen"] == (not keep)


def test_select_off_keeps_the_radius_of_the_lowest_mean_normal_score(nut) -> None:
    train = [read_image(p) for p in nut.train_paths()]
    model = GladModel(**SETTINGS, select=False, far=0.05).fit(train)
    means = {name: row["normal_mean"] for name, row in model.selection_.items()}
    assert glad.selection.radius_name(model.radius_) == min(means, key=means.get)
    assert model.calibration_.far == 0.05


def test_global_selection_score_equals_dense_global_scoring(fitted: GladModel, nut) -> None:
    """The radius selection scores the global mixtures from the candidates' pass; the held-back
    images must get the scores the dense global path gives them."""
    train = [read_image(p) for p in nut.train_paths()]
    held = glad.selection.holdout_indices(len(train), fitted.holdout, fitted.seed)
    assert len(held) >= 2 and "global" in fitted.selection_
    dense = fitted.without_local_weights().score([train[i] for i in held]).scores
    assert fitted.selection_["global"]["normal_mean"] == pytest.approx(float(np.mean(dense)),
                                                                     rel=1e-4)


@pytest.mark.parametrize(("available", "k", "d", "expected"), [
    (1_000, 16, 24, 1_000),  # small data: everything
    (856_000, 256, 24, 50_000),  # a shallow layer: the sample cap, within budget
    (53_000, 256, 112, 50_000),  # EfficientNet-Lite0's deepest layer: the sample cap
    (53_000, 256, 256, 11_025),  # ResNet18's: what the budget affords
    (53_000, 256, 1024, 4_096),  # a huge d: never under 16 vectors per component
    (2_000, 256, 1024, 2_000),  # ... unless fewer exist
])
def test_kmle_sample_size_keeps_the_assignment_work_in_budget(available, k, d, expected) -> None:
    n = glad.layer_fit.kmle_sample_size(available, k, d, max_iter=30, max_samples=50_000)
    assert n == expected
    per_vector = d * d * (k * (1 + 30 // glad.mixture.FULL_PASS_EVERY)
                          + glad.mixture.CANDIDATES * 30)
    assert n * per_vector <= glad.layer_fit.FIT_BUDGET or n == min(available, 16 * k)


def test_backbone_precision_is_checked(monkeypatch) -> None:
    """bf16 autocast is a CUDA option; anything else is refused with a clear error, and the
    environment variable that workers read is validated the same way."""
    with pytest.raises(ValueError, match="CUDA"):
        create_backbone(precision="bf16")
    monkeypatch.setenv("GLAD_BACKBONE_PRECISION", "fp8")
    with pytest.raises(ValueError, match="precision"):
        create_backbone()
    monkeypatch.setenv("GLAD_BACKBONE_PRECISION", "fp32")
    assert create_backbone().precision == "fp32"


def test_a_nan_score_is_an_alarm(fitted: GladModel) -> None:
    """NaN fails closed, as the score stage decides (issue 13, hole 5: `glad score` printed
    `anomalous: false` for a model whose scores were NaN)."""
    decisions = fitted.decide(np.array([fitted.threshold_ - 1.0, np.nan, np.inf]))
    assert decisions.tolist() == [False, True, True]
