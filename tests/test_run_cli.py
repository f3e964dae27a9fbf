"""The streaming commands as users run them: `glad run` end to end in real processes (embedded
Redis, one worker process per stage), `glad status`, `glad models`, and their clear errors."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from streaming import REPO, wait_for

from app.cli import main
from app.options import required_url
from pipeline.connection import connect
from pipeline.embedded import EmbeddedRedis, line_store
from pipeline.errors import PipelineError

pytestmark = pytest.mark.cli


def glad(*args: str, timeout: float = 300, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}  # embedded Redis
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "app.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)


def in_process(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in args])
    return code, out.getvalue()


@pytest.mark.slow
def test_glad_run_scores_a_folder_and_writes_results(pipeline_model, tiny_dataset, tmp_path) -> None:
    source = tiny_dataset / "nut" / "test" / "hole"
    expected = sorted(p.name for p in source.iterdir())
    out = tmp_path / "run"
    done = glad("run", "--model", pipeline_model, "--source", source, "--out", out,
                "--models", tmp_path / "models", "--json")
    assert done.returncode == 0, done.stderr + "".join(
        f.read_text() for f in (out / "logs").glob("*.log"))
    summary = json.loads(done.stdout)
    assert summary["frames"] == summary["scored"] == len(expected)
    assert summary["deadletter"] == 0 and summary["model_version"] == 1
    records = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert sorted(r["name"] for r in records) == expected
    assert len({r["frame_id"] for r in records}) == len(expected)
    assert (out / "scores.csv").read_text().splitlines()[0].startswith("frame_id,camera,")
    anomalous = [r for r in records if r["anomalous"]]
    assert len(list((out / "heatmaps").glob("*.png"))) == len(anomalous)
    assert {p.stem for p in (out / "logs").glob("*.log")} == {"capture", "align", "extract", "score",
                                                             "dashboard", "updater"}
    assert summary["dashboard"].startswith("http://127.0.0.1:")
    assert "glad dashboard: http://127.0.0.1:" in (out / "logs" / "dashboard.log").read_text()
    assert json.loads((out / "summary.json").read_text())["scored"] == len(expected)


def test_glad_run_keeps_its_line_in_the_default_relative_folders(pipeline_model, tiny_dataset,
                                                                 tmp_path) -> None:
    """As a new user runs it: no --out or --models, so the line lives in ./glad-data. The
    embedded Redis changed into its relative folder before binding its relative socket path
    and exited, so `glad run` on a fresh machine stopped at once. A corrupt file in the folder
    is dead-lettered, and `glad status` names it."""
    source = tmp_path / "inbox"
    shutil.copytree(tiny_dataset / "nut" / "test" / "hole", source)
    good = len(list(source.iterdir()))
    (source / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
    done = glad("run", "--model", pipeline_model, "--source", source, "--no-dashboard",
                "--no-updater", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["scored"] == good and summary["deadletter"] == 1
    data = tmp_path / "glad-data"
    assert (data / "redis" / "redis.log").is_file() and (data / "run" / "scores.jsonl").is_file()
    assert (data / "models").is_dir()
    status = glad("status", "--json", timeout=60, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    dead = json.loads(status.stdout)["last_deadletter"]
    assert dead["name"] == "zz_broken.png" and dead["stage"] == "align" and dead["frame_id"]
    assert "not a readable image" in dead["reason"]
    scored = json.loads((data / "run" / "scores.jsonl").read_text().splitlines()[0])["frame_id"]
    confirmed = glad("confirm", scored, "--by", "tester", timeout=60, cwd=tmp_path)
    assert confirmed.returncode == 0, confirmed.stderr  # no --redis-url: the run's own line
    status = glad("status", "--json", timeout=60, cwd=tmp_path)
    assert json.loads(status.stdout)["streams"]["feedback"]["length"] == 1


def test_commands_find_the_embedded_line_of_a_run_going_on(tmp_path, monkeypatch) -> None:
    """Workers, the updater and the dashboard need a running Redis: without --redis-url they use
    the server of a `glad run` going on in ./glad-data (relative, as by default), and say how to
    get one when there is none."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("REDIS_URL", raising=False)
    args = argparse.Namespace(redis_url=None, models=Path("glad-data/models"))
    with pytest.raises(PipelineError, match="start `glad run`"):
        required_url(args)
    with EmbeddedRedis(line_store(args.models)):
        url = required_url(args)
        assert url == f"unix://{tmp_path / 'glad-data' / 'redis' / 'redis.sock'}"
        assert connect(url, wait=5.0).ping()


def test_glad_run_refuses_a_missing_model_and_source(pipeline_model, tmp_path) -> None:
    missing = glad("run", "--model", tmp_path / "nope", "--out", tmp_path / "o", timeout=60)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1] == f"glad: error: {tmp_path / 'nope'}: no such model"
    source = glad("run", "--model", pipeline_model, "--source", tmp_path / "no-such-folder",
                  "--out", tmp_path / "o", timeout=60)
    assert source.returncode == 2 and "Traceback" not in source.stderr
    assert "no-such-folder" in source.stderr.strip().splitlines()[-1]


def test_status_and_models_commands(line, pipeline_model) -> None:
    common = ["--line", line.name, "--redis-url", line.url]
    with line.running("align", "score", heartbeat_s=0.1):
        status = wait_for(lambda: _loaded(in_process("status", *common, "--json")),
                          what="heartbeats of loaded workers")
    assert status["model_version"] == 1
    assert sorted(w["stage"] for w in status["workers"]) == ["align", "score"]
    assert all(w["healthy"] and w["model"] == 1 for w in status["workers"])
    assert status["streams"]["frames"] == {"length": 0, "group": "align", "lag": 0, "pending": 0}
    code, out = in_process("models", "publish", pipeline_model, *common, "--models", line.models,
                           "--note", "retrained", "--json")
    assert code == 0 and json.loads(out)["version"] == 2
    code, out = in_process("models", "list", *common, "--models", line.models, "--json")
    listing = json.loads(out)
    assert listing["current"] == 2 and [v["note"] for v in listing["versions"]] == ["test", "retrained"]


def _loaded(result: tuple[int, str]) -> dict | None:
    code, out = result
    status = json.loads(out)
    assert code == 0
    return status if len(status["workers"]) == 2 and all(w["model"] for w in status["workers"]) \
        else None


def test_a_worker_without_redis_says_so(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no `glad run` going on in ./glad-data
    monkeypatch.delenv("REDIS_URL", raising=False)
    code = main(["stage", "score"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "glad: error: no Redis: pass --redis-url or set REDIS_URL, or start `glad run` (it embeds "
        "one, which the other commands then find)")


def _children(pid: int, name: str) -> list[int]:
    """Process ids of `pid`'s children called `name` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)
            comm, parent = fields[0].split("(", 1)[1], int(fields[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid and comm.startswith(name):
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_glad_run_ends_with_an_error_when_its_embedded_redis_dies(pipeline_model, tiny_dataset,
                                                                  tmp_path) -> None:
    """Issue 13, hole 7: it printed "summary: Redis unreachable" twice a second, forever."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    run = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "run", "--model", str(pipeline_model), "--source",
         str(tiny_dataset / "nut" / "test" / "good"), "--loop", "--fps", "2", "--out", str(out),
         "--models", str(tmp_path / "models"), "--no-dashboard", "--no-updater"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for(lambda: (out / "logs" / "capture.log").exists() or run.poll() is not None,
                 timeout=240, what="the run to capture")
        assert run.poll() is None
        (server,) = _children(run.pid, "redis-server")
        os.kill(server, signal.SIGKILL)
        _, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 2, stderr
    assert "glad: error: the embedded Redis server exited" in stderr, stderr
    assert "Traceback" not in stderr, stderr


@pytest.mark.slow
def test_a_second_run_resumes_the_line_and_the_commands_find_it(pipeline_model, tiny_dataset,
                                                                tmp_path) -> None:
    """Issue 13, hole 12: the embedded line was thrown away, so a second run refitted and
    `glad status` / `glad models list` found nothing without --redis-url."""
    models = tmp_path / "data" / "models"
    common = ["--source", tiny_dataset / "nut" / "test" / "hole", "--models", models,
              "--no-dashboard", "--no-updater", "--json"]
    first = glad("run", "--model", pipeline_model, "--out", tmp_path / "one", *common)
    assert first.returncode == 0, first.stderr
    second = glad("run", "--out", tmp_path / "two", *common)  # no --model: the line's own
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["model_version"] == 1 and "fitting" not in second.stderr
    assert (tmp_path / "data" / "redis").is_dir()  # kept beside the model folders

    def versions() -> list[int]:
        listed = glad("models", "list", "--models", models, "--json", timeout=60)
        assert listed.returncode == 0, listed.stderr
        return [v["version"] for v in json.loads(listed.stdout)["versions"]]

    assert versions() == [1]
    status = glad("status", "--models", models, "--json", timeout=60)
    assert status.returncode == 0 and json.loads(status.stdout)["model_version"] == 1
    fresh = glad("run", "--fresh", "--model", pipeline_model, "--out", tmp_path / "three", *common)
    assert fresh.returncode == 0, fresh.stderr
    assert json.loads(fresh.stdout)["model_version"] == 2  # v0001's folder stays on disk
    assert versions() == [2]
