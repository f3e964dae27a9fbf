"""Exported backbones (`glad export`, glad.runtime): ONNX Runtime and OpenVINO give torch's scores,
the runtime is chosen and reported, mismatching or corrupt exports are refused, exports travel
with published and re-saved models. Real Lite0 weights, the session's tiny nut model."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from streaming import Line

from glad.datasets import MVTecCategory
from glad.errors import ModelFileError, ModelMismatchError
from glad.images import read_image
from glad.manifest import read_manifest
from glad.model import GladModel
from glad.runtime import FORMATS, RuntimeUnavailableError, export_model
from pipeline.registry import ModelFollower
from pipeline.schema import Message, pack_array
from stages.extract import ExtractStage

REPO = Path(__file__).resolve().parents[1]


def glad_command(*args: object) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "app.cli", *map(str, args)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def exported(pipeline_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """A copy of the session's tiny nut model with both exports: ONNX through the `glad export`
    command in a subprocess (its result is what test_cli_export checks), OpenVINO in-process."""
    model_dir = tmp_path_factory.mktemp("exported") / "nut"
    shutil.copytree(pipeline_model, model_dir)
    done = glad_command("export", model_dir, "--format", "onnx", "--json")
    export_model(model_dir, "openvino")
    return model_dir, done


@pytest.fixture(scope="module")
def test_images(tiny_dataset: Path) -> list[np.ndarray]:
    """8 test images of the tiny nut: 4 good, 4 defective."""
    items = MVTecCategory(tiny_dataset / "nut").test_items()
    good = [i for i in items if i.label == 0][:4]
    bad = [i for i in items if i.label == 1][:4]
    return [read_image(item.path) for item in good + bad]


def copy_of(model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "model"))


def test_cli_export(exported) -> None:
    model_dir, done = exported
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["format"] == "onnx"
    assert [Path(f).name for f in report["files"]] == ["backbone.onnx"]
    assert all(Path(f).is_file() for f in report["files"])
    sidecar = json.loads(Path(report["sidecar"]).read_text())
    assert sidecar["preprocessing_hash"] == read_manifest(model_dir)["preprocessing_hash"]
    assert sidecar["input_size"] == 256 and sidecar["format"] == "onnx"
    assert report["max_rel_diff"] < 1e-4
    for name in ("backbone.xml", "backbone.bin", "backbone.openvino.json"):
        assert (model_dir / name).is_file()


def test_cli_export_of_a_missing_model(tmp_path: Path) -> None:
    done = glad_command("export", tmp_path / "nope", "--format", "onnx")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("glad: error:"), done.stderr
    assert "no such model" in lines[0]


def test_exported_runtimes_score_like_torch(exported, test_images) -> None:
    model_dir, _ = exported
    results = {}
    for runtime in ("torch", "onnx", "openvino"):
        model = GladModel.load(model_dir, runtime=runtime)
        results[model.backbone_.runtime] = model.score(test_images).scores
    assert set(results) == {"torch", "onnxruntime", "openvino"}
    reference = results["torch"]
    assert np.isfinite(reference).all() and len(reference) == 8
    for runtime, scores in results.items():
        np.testing.assert_allclose(scores, reference, rtol=1e-3, err_msg=runtime)
        assert list(np.argsort(scores)) == list(np.argsort(reference)), runtime


def test_auto_runtime_uses_the_export_and_says_so(exported, monkeypatch, caplog) -> None:
    model_dir, _ = exported
    monkeypatch.delenv("GLAD_RUNTIME", raising=False)
    with caplog.at_level(logging.INFO, logger="glad.runtime"):
        model = GladModel.load(model_dir)
    assert model.backbone_.runtime == "openvino"  # preferred when both are exported
    lines = [r.getMessage() for r in caplog.records if "runs on" in r.getMessage()]
    assert len(lines) == 1 and "runs on openvino" in lines[0] and "backbone.xml" in lines[0]

    monkeypatch.setenv("GLAD_RUNTIME", "onnx")
    assert GladModel.load(model_dir).backbone_.runtime == "onnxruntime"
    monkeypatch.setenv("GLAD_RUNTIME", "torch")
    assert GladModel.load(model_dir).backbone_.runtime == "torch"
    monkeypatch.setenv("GLAD_RUNTIME", "tensorrt")
    with pytest.raises(RuntimeUnavailableError, match="unknown backbone runtime 'tensorrt'"):
        GladModel.load(model_dir)


def test_missing_runtime_package_falls_back_to_torch(exported, monkeypatch, caplog) -> None:
    import glad.runtime

    model_dir, _ = exported
    monkeypatch.delenv("GLAD_RUNTIME", raising=False)
    packages = {fmt.package for fmt in FORMATS.values()}
    real = glad.runtime.importlib.util.find_spec
    monkeypatch.setattr(glad.runtime.importlib.util, "find_spec",
                        lambda name, *a: None if name in packages else real(name, *a))
    with caplog.at_level(logging.INFO, logger="glad.runtime"):
        model = GladModel.load(model_dir)
    assert model.backbone_.runtime == "torch"
    assert "onnxruntime is not installed (pip install glad-stream[onnx])" in caplog.text
    with pytest.raises(RuntimeUnavailableError, match=r"pip install glad-stream\[onnx\]"):
        GladModel.load(model_dir, runtime="onnx")


def test_mismatching_or_corrupt_export_is_refused(exported, tmp_path, caplog) -> None:
    model_dir = copy_of(exported[0], tmp_path)
    sidecar_file = model_dir / "backbone.openvino.json"
    sidecar = json.loads(sidecar_file.read_text())
    sidecar["preprocessing_hash"] = "0123456789abcdef"
    sidecar_file.write_text(json.dumps(sidecar))
    with pytest.raises(ModelMismatchError) as error:
        GladModel.load(model_dir, runtime="openvino")
    message = str(error.value)
    assert "\n" not in message
    assert "0123456789abcdef" in message and read_manifest(model_dir)["preprocessing_hash"] in message
    assert "glad export" in message
    # auto: the stale export is refused with the same line, and the next usable one runs
    with caplog.at_level(logging.INFO, logger="glad.runtime"):
        assert GladModel.load(model_dir, runtime="auto").backbone_.runtime == "onnxruntime"
    assert "0123456789abcdef" in caplog.text

    (model_dir / "backbone.onnx").write_bytes(b"not the network")
    with pytest.raises(ModelFileError, match="backbone.onnx: content hash does not match"):
        GladModel.load(model_dir, runtime="onnx")
    assert GladModel.load(model_dir).backbone_.runtime == "torch"  # nothing usable left
    with pytest.raises(RuntimeUnavailableError, match="CPU only"):
        GladModel.load(model_dir, runtime="onnx", device="cuda")


def test_export_travels_with_published_and_resaved_models(exported, redis_server, tmp_path,
                                                          caplog) -> None:
    model_dir, _ = exported
    line = Line.create("exporttravels", redis_server.url, tmp_path / "models", model_dir)
    published = line.registry().path(1)
    assert (published / "backbone.onnx").is_file()  # publishing copies the whole directory
    model = GladModel.load(published, runtime="onnx")
    resaved = model.save(tmp_path / "resaved")  # e.g. the online updater's next version
    assert GladModel.load(resaved).backbone_.runtime == "onnxruntime"

    stage = ExtractStage(ModelFollower(line.registry()))
    assert stage.ready()
    image = np.zeros((256, 256, 3), np.uint8)
    message = Message("aligned", "f1", line.name, "cam", time.time(),
                      {"status": "ok", "image": pack_array(image), "valid": None, "warp": None,
                       "frame_shape": [256, 256, 3]})
    with caplog.at_level(logging.INFO, logger="stages.extract"):
        out = stage.process([message])
    assert len(out[0].body["features"]) == 3
    assert "extract: backbone efficientnet_lite0 on openvino (model version 1)" in caplog.text
