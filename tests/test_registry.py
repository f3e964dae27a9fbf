"""The model registry and operator feedback on a real Redis: versions, provenance, promote,
rollback, diff, and confirmations on the feedback stream (through the `glad` command)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from streaming import with_threshold_moved

from app.cli import main
from glad.modelfile import MANIFEST
from pipeline.errors import MessageError, PipelineError
from pipeline.registry import ModelFollower
from pipeline.schema import decode_entry
from pipeline.streams import read_events


def glad(*args) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in args])
    return code, out.getvalue()


def test_versions_promote_rollback_and_the_history(line, pipeline_model) -> None:
    registry = line.registry()
    v2 = registry.publish(pipeline_model, note="second", parent=1, provenance={"frames": ["a"]})
    v3 = registry.publish(pipeline_model, note="third", parent=2)
    assert (v2, v3, registry.current()) == (2, 3, 3)
    assert registry.rollback() == 2 and registry.current() == 2
    assert registry.rollback() == 1
    with pytest.raises(PipelineError, match="no earlier model version"):
        registry.rollback()
    registry.set_current(3)
    assert registry.rollback() == 1  # back to what was current before the promotion
    with pytest.raises(PipelineError, match="has no model version 9"):
        registry.set_current(9)
    record = registry.record(2)
    assert record["parent"] == 1 and record["provenance"] == {"frames": ["a"]}
    assert record["manifest"]["threshold"] == registry.record(1)["manifest"]["threshold"]
    events = [e for _, e in read_events(line.client, line.streams) if e["event"] == "model_current"]
    assert [e["version"] for e in events] == [1, 2, 3, 2, 1, 3, 1]


def test_models_commands(line, pipeline_model, tmp_path) -> None:
    common = ["--line", line.name, "--redis-url", line.url, "--models", line.models]
    changed = with_threshold_moved(pipeline_model, 1.0, tmp_path / "changed")
    manifest = json.loads((changed / MANIFEST).read_text())
    assert glad("models", "publish", changed, *common, "--note", "looser")[0] == 0
    code, out = glad("models", "diff", "1", "2", *common, "--json")
    changes = json.loads(out)["changes"]
    assert code == 0 and list(changes) == ["threshold"]
    assert changes["threshold"][1] == pytest.approx(changes["threshold"][0] + 1.0)
    code, out = glad("models", "show", "2", *common)
    assert code == 0 and "looser" in out and "threshold" in out
    assert f"false alarms {manifest['calibration']['far']:.3g} per normal part" in out
    assert "canaries: recall" in out and "<- chosen" in out  # the selection table
    assert "JPEG round trip at quality 95" in out  # the default compression noise floor
    assert glad("models", "rollback", *common) == (0, f"line {line.name}: rolled back to version 1\n")
    assert glad("models", "promote", "2", *common)[0] == 0
    assert line.registry().current() == 2


def test_a_scorer_follows_promote_and_rollback(line, pipeline_model) -> None:
    follower = ModelFollower(line.registry())
    assert follower.refresh() and follower.version == 1
    line.registry().publish(pipeline_model)
    assert follower.refresh() and follower.version == 2
    line.registry().rollback()
    assert follower.refresh() and follower.version == 1


def test_confirmations_land_on_the_feedback_stream(line) -> None:
    code, out = glad("confirm", "f1", "f2", "--line", line.name, "--redis-url", line.url,
                     "--by", "anna")
    code2, _ = glad("confirm", "f3", "--anomalous", "--line", line.name, "--redis-url", line.url)
    assert code == code2 == 0 and out.count("confirmed normal") == 2
    messages = [decode_entry(f, "feedback") for _, f in
                line.client.xrange(line.streams.key("feedback"))]
    assert [(m.frame_id, m.body["verdict"], m.body["by"]) for m in messages] == [
        ("f1", "normal", "anna"), ("f2", "normal", "anna"), ("f3", "anomalous", "operator")]


def test_bad_confirmations_are_refused() -> None:
    from pipeline.feedback import confirm

    with pytest.raises(MessageError, match="verdict must be one of"):
        confirm(None, "line1", "f1", "maybe")
    with pytest.raises(MessageError, match="bad frame id"):
        confirm(None, "line1", "", "normal")


def test_status_shows_every_kind_of_heartbeat(line) -> None:
    """The updater's heartbeat has no dead-letter count (issue 13, hole 1: `glad status`
    crashed with KeyError 'deadlettered' on a default `glad run` line)."""
    from pipeline.streams import Streams, beat

    streams = Streams(line.name)
    beat(line.client, streams, "updater-1", "updater", 0.0, state="leading", model=1,
         processed=3, updates=1)
    beat(line.client, streams, "score-1", "score", 0.0, state="running", processed=7,
         deadlettered=2, claimed=0)
    code, out = glad("status", "--line", line.name, "--redis-url", line.url)
    assert code == 0
    updater = next(row for row in out.splitlines() if row.startswith("updater-1"))
    score = next(row for row in out.splitlines() if row.startswith("score-1"))
    assert updater.split()[4:6] == ["3", "-"] and score.split()[4:6] == ["7", "2"]


def test_leftovers_of_interrupted_publishes_are_collected(line, pipeline_model) -> None:
    import os
    import shutil
    import time

    registry = line.registry()
    assert registry.publish(pipeline_model) == 2
    old = time.time() - 3600

    def leftover(name: str, age: float | None = old):
        path = registry.folder / name
        shutil.copytree(pipeline_model, path)
        if age is not None:
            os.utime(path, (age, age))
        return path

    stale_staging = leftover(".staging-7-12345")
    fresh_staging = leftover(".staging-8-12346", age=None)  # a publish may be copying it now
    unrecorded = leftover("v0001x")  # not a version name: left alone
    shutil.rmtree(registry.path(1))  # v1's folder was removed by hand: nothing to collect
    never_recorded = registry.folder / "v0001"
    shutil.copytree(pipeline_model, never_recorded)
    registry.client.hdel(line.streams.model("versions"), "1")
    os.utime(never_recorded, (old, old))
    newest_unrecorded = leftover("v0009")  # above every recorded version: kept
    removed = registry.collect_garbage()
    assert sorted(p.name for p in removed) == [".staging-7-12345", "v0001"]
    assert not stale_staging.exists() and not never_recorded.exists()
    assert fresh_staging.exists() and unrecorded.exists() and newest_unrecorded.exists()
    assert registry.path(2).is_dir()  # the current version is never touched


def test_a_line_redis_forgot_is_restored_from_its_folder(line, pipeline_model) -> None:
    """Issue 13, hole 8: after a Redis restart without persistence the pointer, the records and
    the version counter come back from the folder (each version's record.json, CURRENT)."""
    registry = line.registry()
    assert registry.publish(pipeline_model, note="second") == 2
    registry.rollback()
    for key in line.client.scan_iter(line.streams.prefix + "*"):
        line.client.delete(key)
    assert registry.current() is None
    assert registry.restore() == 1  # the version current when the data went
    assert registry.restore() == 1  # idempotent: nothing more to do
    assert [r["version"] for r in registry.versions()] == [1, 2]
    assert registry.record(2)["note"] == "second"
    assert registry.publish(pipeline_model) == 3  # numbering goes on
    registry.forget_current()
    for key in line.client.scan_iter(line.streams.prefix + "*"):
        line.client.delete(key)
    assert registry.restore() is None  # a line started over has nothing to restore
