"""The `glad` command: synth, fit, score, eval in-process through `main(argv)`, plus real
subprocesses for `--help` and for the exit status of an error.

Fitted artifacts are shared through module-scoped fixtures; fits use the small-budget flags
(--components, --max-components, --max-iter) to stay fast.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from app.cli import main
from glad.synth import PRESETS, defect_types

pytestmark = pytest.mark.cli

REPO = Path(__file__).resolve().parents[1]
TINY = PRESETS["tiny"]
EVAL_KEYS = {"category", "method", "image_auroc", "pixel_auroc", "fit_s", "score_ms", "model_mb"}


def run(argv: list[str]) -> tuple[int, str]:
    """main(argv) in-process; returns (exit code, stdout). For module-scoped fixtures."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in argv])
    return code, out.getvalue()


def one_error_line(capsys: pytest.CaptureFixture[str], code: int) -> str:
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("glad: error:"), lines[0]
    assert "Traceback" not in captured.err
    return lines[0]


@pytest.fixture(scope="module")
def nut_root(tiny_dataset: Path) -> Path:
    return tiny_dataset / "nut"


@pytest.fixture(scope="module")
def fitted_model(nut_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """`glad fit` once per module: small K, fixed radius (no radius search)."""
    out = tmp_path_factory.mktemp("cli_models") / "nut"
    code, stdout = run(["fit", nut_root, "--out", out, "--components", "8", "--radius", "1",
                        "--far", "0.02", "--json"])
    assert code == 0
    return out, json.loads(stdout)


def test_synth_writes_the_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "data"
    code = main(["synth", str(out), "--preset", "tiny", "--categories", "nut"])
    assert code == 0
    assert str(out / "nut") in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["nut"]
    root = out / "nut"
    assert len(list((root / "train" / "good").glob("*.png"))) == TINY.n_train
    assert len(list((root / "test" / "good").glob("*.png"))) == TINY.n_test_good
    for defect in defect_types("nut"):
        images = sorted((root / "test" / defect).glob("*.png"))
        masks = sorted((root / "ground_truth" / defect).glob("*_mask.png"))
        assert len(images) == len(masks) == TINY.n_test_defect
        assert [m.name for m in masks] == [f"{p.stem}_mask.png" for p in images]


def test_synth_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["synth", str(tmp_path), "--preset", "tiny", "--categories", "weave", "--json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out) == {"categories": [str(tmp_path / "weave")]}


def test_fit_writes_a_model(fitted_model) -> None:
    out, summary = fitted_model
    assert (out / "manifest.json").is_file() and (out / "arrays.safetensors").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backbone"]["name"] == "efficientnet_lite0"
    assert manifest["radius"] == 1
    assert [layer["n_components"] for layer in manifest["layers"]] == summary["components"]
    assert all(1 <= k <= 8 for k in summary["components"])
    assert summary["images"] == TINY.n_train
    assert summary["model"] == str(out)
    assert summary["threshold"] == manifest["threshold"]
    assert summary["model_mb"] > 0
    assert summary["calibration"]["far"] == 0.02 == manifest["calibration"]["far"]
    assert summary["validation"]["n_canaries"] > 0 and "r=1" in summary["selection"]


def test_fit_prints_what_it_chose(nut_root: Path, tmp_path: Path) -> None:
    """Without --json, the summary says whether the model aligns and prints the table of the
    localisation candidates it chose among (the radius search), with the chosen one marked."""
    code, stdout = run(["fit", nut_root, "--out", tmp_path / "m", "--components", "4"])
    assert code == 0
    lines = stdout.splitlines()
    assert lines[0].startswith("fitted on ") and "aligned" in lines[0]
    header = next(i for i, line in enumerate(lines) if line.strip().startswith("candidate"))
    rows = lines[header + 1:]
    assert {"r=1", "r=2", "r=4", "global"} <= {row.split()[0] for row in rows if row.strip()}
    assert sum(row.endswith("<- chosen") for row in rows) == 1


def test_fit_keeps_the_backbone_that_separates_canaries_best(nut_root: Path,
                                                                tmp_path: Path) -> None:
    """Several backbones: each is fitted, the chosen one is saved, both rows are reported."""
    out = tmp_path / "m"
    code, stdout = run(["fit", nut_root, "--out", out, "--backbone",
                        "efficientnet_lite0,resnet18", "--weights", "random", "--components", "4",
                        "--radius", "1", "--json"])
    assert code == 0
    summary = json.loads(stdout)
    rows = {name: row for name, row in summary["selection"].items() if name.startswith("backbone")}
    assert set(rows) == {"backbone efficientnet_lite0", "backbone resnet18"}
    chosen = [name.split()[1] for name, row in rows.items() if row["chosen"]]
    assert chosen == [summary["backbone"]]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backbone"]["name"] == summary["backbone"]
    assert set(rows) <= set(manifest["training"]["selection"])


def test_fit_refuses_an_unknown_backbone_in_a_list(nut_root: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["fit", str(nut_root), "--out", str(tmp_path / "m"), "--backbone",
              "efficientnet_lite0,vgg_imaginary"])
    assert exited.value.code == 2 and "'vgg_imaginary'" in capsys.readouterr().err


def test_fit_refuses_a_false_alarm_rate_outside_0_1(nut_root: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["fit", str(nut_root), "--out", str(tmp_path / "m"), "--far", "1.5"])
    assert "false-alarm rate" in one_error_line(capsys, code)


def test_score_json_and_heatmaps(fitted_model, nut_root: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    model, _ = fitted_model
    good = sorted((nut_root / "test" / "good").glob("*.png"))[:2]
    defect_folder = nut_root / "test" / defect_types("nut")[0]
    heat_dir = tmp_path / "heat"
    code = main(["score", str(model), *map(str, good), str(defect_folder), "--json",
                 "--heatmaps", str(heat_dir)])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["results"]
    expected = [*good, *sorted(defect_folder.glob("*.png"))]
    assert [row["image"] for row in rows] == [str(p) for p in expected]
    assert report["threshold"] == json.loads((model / "manifest.json").read_text())["threshold"]
    for row in rows:
        assert isinstance(row["score"], float) and np.isfinite(row["score"])
        assert row["anomalous"] == (row["score"] > report["threshold"])
        picture = cv2.imread(row["heatmap"])
        assert Path(row["heatmap"]).parent == heat_dir
        assert picture is not None and picture.shape == (256, 512, 3)
    assert len(list(heat_dir.glob("*.png"))) == len(expected)


def test_score_text_output(fitted_model, nut_root: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    model, _ = fitted_model
    image = sorted((nut_root / "test" / "good").glob("*.png"))[0]
    assert main(["score", str(model), str(image)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith(str(image)) and lines[1].startswith("threshold")


def test_eval_json(nut_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["eval", str(nut_root.parent), "--categories", "nut", "--methods",
                 "glad,glad-global,padim,mahaad", "--max-components", "8", "--max-iter", "5",
                 "--json"])
    assert code == 0
    records = json.loads(capsys.readouterr().out)["results"]
    assert [(r["category"], r["method"]) for r in records] == [
        ("nut", "glad"), ("nut", "glad-global"), ("nut", "padim"), ("nut", "mahaad")]
    for record in records:
        assert record.keys() >= EVAL_KEYS
        assert 0.0 <= record["image_auroc"] <= 1.0
        if record["method"] != "mahaad":  # synth nut has masks; MahaAD does not localise
            assert 0.0 <= record["pixel_auroc"] <= 1.0
        assert record["fit_s"] > 0 and record["score_ms"] > 0 and record["model_mb"] > 0


# --- errors: one line on stderr, exit status 2 ------------------------------------------------


def test_fit_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["fit", str(tmp_path / "missing"), "--out", str(tmp_path / "m")])
    assert "missing" in one_error_line(capsys, code)
    assert not (tmp_path / "m").exists()


def test_fit_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    one_error_line(capsys, main(["fit", str(empty), "--out", str(tmp_path / "m")]))


def test_fit_bad_components(nut_root: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["fit", str(nut_root), "--out", str(tmp_path / "m"), "--components", "many"])
    assert "--components" in one_error_line(capsys, code)


def test_score_corrupt_image(fitted_model, nut_root: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    """A corrupt or truncated file among good ones: the good ones are still scored, the bad ones
    listed without a verdict, and the command ends with one error line and status 2."""
    model, _ = fitted_model
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 100)
    good = sorted((nut_root / "test" / "good").glob("*.png"))[0]
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:2000])
    code = main(["score", str(model), str(corrupt), str(good), str(truncated), "--json"])
    report = json.loads(capsys.readouterr().out)
    rows = {Path(row["image"]).name: row for row in report["results"]}
    assert list(rows) == ["corrupt.png", good.name, "truncated.png"]
    for name in ("corrupt.png", "truncated.png"):
        assert rows[name]["score"] is None and rows[name]["anomalous"] is None
        assert rows[name]["status"].startswith("unreadable: ") and name in rows[name]["status"]
    assert isinstance(rows[good.name]["score"], float) and rows[good.name]["status"] == "ok"
    assert code == 2
    error = one_error_line(capsys, main(["score", str(model), str(corrupt)]))
    assert "1 of 1 images could not be read" in error and "corrupt.png" in error


def test_score_missing_image(fitted_model, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    model, _ = fitted_model
    one_error_line(capsys, main(["score", str(model), str(tmp_path / "nope.png")]))


def test_score_missing_model(nut_root: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    image = sorted((nut_root / "test" / "good").glob("*.png"))[0]
    code = main(["score", str(tmp_path / "no-model"), str(image)])
    assert "no-model" in one_error_line(capsys, code)


def test_eval_missing_root_and_unknown_method(tmp_path: Path, nut_root: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    one_error_line(capsys, main(["eval", str(tmp_path / "missing"), "--json"]))
    code = main(["eval", str(nut_root.parent), "--methods", "glad,magic"])
    assert "magic" in one_error_line(capsys, code)
    code = main(["eval", str(nut_root.parent), "--categories", "pcb", "--methods", "padim"])
    one_error_line(capsys, code)


# --- real subprocesses ------------------------------------------------------------------------


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_help_in_a_subprocess() -> None:
    done = subprocess.run([sys.executable, "-m", "app.cli", "--help"], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for command in ("synth", "fit", "score", "eval"):
        assert command in done.stdout


def test_error_exit_status_in_a_subprocess(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "score", str(tmp_path / "no-model"),
         str(tmp_path / "x.png")],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("glad: error:")
    assert done.stdout == ""


def test_eval_randomize_adds_randomized_records(nut_root: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["eval", str(nut_root.parent), "--categories", "nut", "--methods", "glad,padim",
                 "--max-components", "8", "--max-iter", "5", "--randomize", "3", "--json"])
    assert code == 0
    records = json.loads(capsys.readouterr().out)["results"]
    assert [(r["method"], r["randomize_seed"]) for r in records] == [
        ("glad", None), ("padim", None), ("glad", 3), ("padim", 3)]
    assert all(0.0 <= r["image_auroc"] <= 1.0 for r in records)
