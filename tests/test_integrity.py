"""Model files are data from disk: edited, truncated or inconsistent ones are refused with one
clear line when loaded, by `glad score`, and by the registry before any scorer is pointed at them
(issue 13, hole 4). Tampering here recomputes every hash, as a careless tool would."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from app.cli import main
from glad.errors import ModelFileError
from glad.integrity import CONTENT_HASH, check_manifest, probe_image, sealed
from glad.model import GladModel
from glad.modelfile import ARRAYS, MANIFEST
from glad.runtime import file_sha256


def tampered(model: Path, tmp_path: Path, edit_manifest: Callable[[dict], None] | None = None,
             edit_arrays: Callable[[dict], None] | None = None, reseal: bool = True) -> Path:
    """A copy of `model` edited, with the arrays' hash and the manifest's content hash redone."""
    copy = tmp_path / "tampered"
    shutil.copytree(model, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    if edit_arrays is not None:
        arrays = load_file(str(copy / ARRAYS))
        edit_arrays(arrays)
        save_file(arrays, str(copy / ARRAYS))
        manifest["arrays_sha256"] = file_sha256(copy / ARRAYS)
    if edit_manifest is not None:
        edit_manifest(manifest)
    if reseal:
        manifest = sealed(manifest)
    (copy / MANIFEST).write_text(json.dumps(manifest))
    return copy


def setter(path: str, value) -> Callable[[dict], None]:
    def edit(manifest: dict) -> None:
        *parents, last = path.split(".")
        target = manifest
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        target[last] = value
    return edit


def test_a_saved_model_is_sealed_and_loads(pipeline_model: Path) -> None:
    manifest = json.loads((pipeline_model / MANIFEST).read_text())
    assert sealed(manifest)[CONTENT_HASH] == manifest[CONTENT_HASH]
    model = GladModel.load(pipeline_model)
    assert model.probe_score() == pytest.approx(manifest["probe"]["score"], rel=1e-4)


def test_an_edit_without_resealing_is_caught_by_the_content_hash(pipeline_model, tmp_path) -> None:
    edited = tampered(pipeline_model, tmp_path, setter("threshold", 1e9), reseal=False)
    with pytest.raises(ModelFileError, match="content hash"):
        GladModel.load(edited)


def test_far_out_scores_of_a_legitimate_model_are_accepted(pipeline_model, tmp_path) -> None:
    """A model of bottles scores the probe image 1.3e8 (measured): large scores are data."""
    edited = tampered(pipeline_model, tmp_path, setter("probe.score", 1.3e8))
    check_manifest(json.loads((edited / MANIFEST).read_text()), edited)
    with pytest.raises(ModelFileError, match="probe image"):  # but it must still reproduce it
        GladModel.load(edited)


MALFORMED = {
    "wrong grid": setter("layers.0.grid", [32, 32]),
    "huge input size": setter("backbone.input_size", 100000),
    "input size of the wrong type": setter("backbone.input_size", "256"),
    "threshold of 1e308": lambda m: (setter("threshold", 1e308)(m),
                                     setter("calibration.threshold", 1e308)(m)),
    "threshold beside its calibration": setter("threshold", 1.0),
    "NaN threshold": setter("threshold", math.nan),
    "unknown backbone": setter("backbone.name", "vgg_imaginary"),
    "wrong channels": setter("backbone.channels", [24, 40, 80]),
    "negative std": setter("backbone.std", [0.5, -0.5, 0.5]),
    "quantile above one": setter("params.quantile", 2.0),
    "unknown motion": setter("params.motion", "teleport"),
    "batch size zero": setter("params.batch_size", 0),
    "layers not a list": setter("layers", {"0": 1}),
    "two layers": lambda m: m["layers"].pop(),
    "K as text": setter("layers.1.n_components", "8"),
    "missing backbone": lambda m: m.pop("backbone"),
    "missing probe": lambda m: m.pop("probe"),
    "NaN novelty level": setter("online.novelty_loglik", [math.nan, 0.0, 0.0]),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_manifests_are_one_model_file_error(pipeline_model, tmp_path, case) -> None:
    with pytest.raises(ModelFileError, match="manifest field|lack") as caught:
        GladModel.load(tampered(pipeline_model, tmp_path, MALFORMED[case]))
    assert "\n" not in str(caught.value)


def test_nan_means_are_refused(pipeline_model, tmp_path) -> None:
    def poison(arrays: dict) -> None:
        arrays["layer0.means"] = np.full_like(arrays["layer0.means"], np.nan)

    with pytest.raises(ModelFileError, match="layer0.means.*NaN"):
        GladModel.load(tampered(pipeline_model, tmp_path, edit_arrays=poison))


def test_local_weights_naming_missing_gaussians_are_refused(pipeline_model, tmp_path) -> None:
    def poison(arrays: dict) -> None:
        arrays["layer1.local.components"] = arrays["layer1.local.components"] + 1000

    with pytest.raises(ModelFileError, match="outside"):
        GladModel.load(tampered(pipeline_model, tmp_path, edit_arrays=poison))


def test_random_backbone_weights_fail_the_probe(pipeline_model, tmp_path) -> None:
    edited = tampered(pipeline_model, tmp_path, setter("backbone.weights", "random"))
    with pytest.raises(ModelFileError, match="probe image"):
        GladModel.load(edited)


def test_probe_image_is_fixed_and_varied() -> None:
    image = probe_image(64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert np.array_equal(image, probe_image(64)) and image.std() > 20


def test_glad_score_on_a_tampered_model_is_a_clean_error(pipeline_model, tmp_path, capsys) -> None:
    edited = tampered(pipeline_model, tmp_path, setter("backbone.input_size", 100000))
    image = tmp_path / "frame.png"
    import cv2
    cv2.imwrite(str(image), probe_image(256))
    code = main(["score", str(edited), str(image)])
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err
    assert captured.err.strip().startswith("glad: error:") and "input_size" in captured.err


def test_the_registry_refuses_a_tampered_model_and_keeps_the_pointer(line, pipeline_model,
                                                                     tmp_path) -> None:
    def poison(arrays: dict) -> None:
        arrays["layer2.whiteners"] = arrays["layer2.whiteners"] * np.nan

    registry = line.registry()
    with pytest.raises(ModelFileError, match="NaN"):
        registry.publish(tampered(pipeline_model, tmp_path, edit_arrays=poison))
    assert registry.current() == 1 and [r["version"] for r in registry.versions()] == [1]
