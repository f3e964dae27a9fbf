"""The online updater service against a real Redis and real pipeline stages: confirmations in,
checked versions out; bad feedback, duplicates, restarts and a second updater."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from streaming import REPO, wait_for

from glad import synth
from glad.model import GladModel
from online.gate import GateConfig
from online.updater import FeedbackError, Updater, UpdaterConfig
from pipeline.feedback import confirm
from pipeline.schema import FIELD, Message
from stages.capture import publish_frame

FAST = UpdaterConfig(holdback_every=3, gate=GateConfig(min_held_back=4), block_ms=50)


def variant_frames(count: int, seed: int = 0) -> list[np.ndarray]:
    """Normal nuts of a new supplier's colour (the tiny model only knows the old one)."""
    return [synth.render_normal("nut", np.random.default_rng(seed + i), 256, variant="recoloured")
            for i in range(count)]


def score_frames(line, images: list[np.ndarray], prefix: str) -> list[str]:
    ids = [publish_frame(line.client, line.name, image=image, frame_id=f"{prefix}{i:03d}")
           for i, image in enumerate(images)]
    with line.running("align", "extract", "score"):
        wait_for(lambda: line.client.xlen(line.streams.key("scores")) >= len(ids), timeout=120,
                 what="every frame scored")
    return ids


def updater(line, config: UpdaterConfig = FAST, worker: str | None = None) -> Updater:
    return Updater(line.client, line.streams, line.registry(), config, worker=worker)


def test_confirmed_variant_is_learned_validated_and_published(line) -> None:
    ids = score_frames(line, variant_frames(14), "v")
    learn_ids, later = ids[:12], ids[12:]
    for frame_id in learn_ids:
        confirm(line.client, line.name, frame_id, "normal")
    service = updater(line)
    service.run(once=True)
    registry = line.registry()
    assert registry.current() == 2
    record = registry.record(2)
    provenance = record["provenance"]
    assert record["parent"] == 1 and provenance["by"] == "updater"
    held = {learn_ids[i] for i in (0, 3, 6, 9)}
    assert set(provenance["frames"]) == set(learn_ids) - held, "held-back frames must not train"
    validation = provenance["validation"]
    assert validation["passed"] and validation["held_back"] == 4 and validation["canaries"] >= 1
    assert record["threshold"] == pytest.approx(validation["threshold"])
    # the published version finds the new colour normal where version 1 did not
    v1, v2 = (GladModel.load(registry.path(v)) for v in (1, 2))
    unseen = variant_frames(4, seed=100)
    assert v2.decide(v2.score(unseen).scores).mean() < v1.decide(v1.score(unseen).scores).mean()
    assert v2.layers_[0].mixture.stats.weight.sum() > v1.layers_[0].mixture.stats.weight.sum()
    assert later[0] not in provenance["frames"]


def test_bad_feedback_is_dead_lettered_and_duplicates_apply_once(line) -> None:
    ids = score_frames(line, variant_frames(2), "b")
    confirm(line.client, line.name, ids[0], "normal")
    confirm(line.client, line.name, ids[0], "normal")  # the operator clicked twice
    confirm(line.client, line.name, "never-scored", "normal")
    foreign = Message("feedback", ids[1], "another-line", "", time.time(), {"verdict": "normal"})
    line.client.xadd(line.streams.key("feedback"), {FIELD: foreign.encode()})
    line.client.xadd(line.streams.key("feedback"), {FIELD: b"\x93not a message"})
    service = updater(line)
    service.run(once=True)
    reasons = [letter["reason"] for letter in line.deadletters()]
    assert len(reasons) == 4
    assert any("confirmed before" in r for r in reasons)
    assert any("unknown or expired frame id 'never-scored'" in r for r in reasons)
    assert any("names line 'another-line'" in r for r in reasons)
    assert service.state.applied == [ids[0]] and service.state.confirmed_normal == 1
    assert line.client.xpending(line.streams.key("feedback"), "updater")["pending"] == 0


def test_restart_resumes_from_committed_state_and_never_reapplies(line) -> None:
    ids = score_frames(line, variant_frames(8), "r")
    for frame_id in ids:
        confirm(line.client, line.name, frame_id, "normal")
    first = updater(line)
    first.run(once=True)
    steps, version = first.online.steps_, line.registry().current()
    # a crash after the state commit but before the acknowledgement: every entry comes again
    line.client.xgroup_setid(line.streams.key("feedback"), "updater", "0")
    second = updater(line)
    second.run(once=True)
    assert second.online.steps_ == steps, "a confirmation was applied twice"
    assert second.state.applied == first.state.applied
    assert line.registry().current() == version
    assert len(second.gate.held_back) == len(first.gate.held_back)


def test_one_updater_leads_and_a_standby_takes_over(line) -> None:
    config = UpdaterConfig(holdback_every=3, gate=GateConfig(min_held_back=4), block_ms=50,
                           lease_ms=600)
    leader, standby = updater(line, config, "A"), updater(line, config, "B")
    thread = threading.Thread(target=leader.run, daemon=True)
    thread.start()
    wait_for(lambda: leader.lease.current_holder() == "A", what="A leads")
    with pytest.raises(FeedbackError, match="another updater"):
        standby.run(once=True)
    ids = score_frames(line, variant_frames(2), "s")
    leader.stop_event.set()
    thread.join(timeout=30)
    confirm(line.client, line.name, ids[0], "normal")
    assert leader.lease.current_holder() is None, "a stopped updater hands its lease over"
    standby.run(once=True)
    assert standby.state.applied == [ids[0]], "the standby did not take over"
    assert standby.lease.current_holder() is None


def test_a_failing_candidate_is_kept_with_its_reasons_not_published(line) -> None:
    ids = score_frames(line, variant_frames(3), "f")
    for frame_id in ids:
        confirm(line.client, line.name, frame_id, "normal")
    command = [sys.executable, "-m", "app.cli", "updater", "--line", line.name,
               "--redis-url", line.url, "--models", str(line.models), "--holdback-every", "2",
               "--min-held-back", "50", "--gate-frames", "50", "--once", "--json"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["version"] == 1 and summary["confirmed_normal"] == 3
    assert line.registry().current() == 1
    parked = sorted((line.models / line.name / "candidates").glob("g*/validation.json"))
    assert parked, "the rejected candidate was not kept"
    record = json.loads(parked[-1].read_text())
    assert not record["passed"] and "held-back normal frames" in record["reasons"][0]
    events = line.client.xrange(line.streams.key("events"))
    assert any(b"candidate_rejected" in b"".join(f.values()) for _, f in events)


def test_killed_mid_flood_the_updater_resumes_without_losing_or_doubling(line, tmp_path) -> None:
    import signal

    ids = score_frames(line, variant_frames(15), "k")
    for frame_id in ids:  # a flood: every frame confirmed at once
        confirm(line.client, line.name, frame_id, "normal")
    command = [sys.executable, "-m", "app.cli", "-v", "updater", "--line", line.name,
               "--redis-url", line.url, "--models", str(line.models), "--holdback-every", "3"]
    pointer = line.models / line.name / "updater" / "CURRENT"
    for attempt, settle in enumerate((0.0, 1.5)):
        log = tmp_path / f"updater{attempt}.log"
        with open(log, "w") as out:
            worker = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        before = pointer.read_text() if pointer.exists() else None
        wait_for(lambda: pointer.exists() and pointer.read_text() != before, timeout=120,  # noqa: B023
                 what="a state commit")
        time.sleep(settle)
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
        line.client.delete(line.streams.updater_lease)  # as if it had lapsed
    done = subprocess.run(command + ["--once", "--json"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    state = json.loads((pointer.parent / pointer.read_text() / "state.json").read_text())
    assert sorted(state["applied"]) == sorted(ids), "a confirmation was lost or doubled"
    assert summary["confirmed_normal"] == len(ids) and summary["held_back"] == 5
    working = GladModel.load(pointer.parent / pointer.read_text() / "model")
    assert working.online_["steps"] == len(ids) - 5, "learned frames counted twice or lost"
    current = line.registry().current()
    GladModel.load(line.registry().path(current))  # the current version is whole
    assert line.client.xpending(line.streams.key("feedback"), "updater")["pending"] == 0


def test_a_failing_update_is_parked_and_the_updater_keeps_serving(line, monkeypatch) -> None:
    from glad.online_kmle import OnlineGlad

    ids = score_frames(line, variant_frames(8), "e")
    first, later = ids[:6], ids[6:]
    for frame_id in first:  # frames 0 and 3 are held back, the other four learned in one batch
        confirm(line.client, line.name, frame_id, "normal")

    def broken(self, features, valid):
        raise RuntimeError("singular matrix in the update")

    monkeypatch.setattr(OnlineGlad, "learn", broken)
    service = updater(line)
    service.run(once=True)  # returns: the error did not end the service
    assert service.online.steps_ == 0 and line.registry().current() == 1
    assert service.state.applied == first
    assert line.client.xpending(line.streams.key("feedback"), "updater")["pending"] == 0
    parked = sorted((line.models / line.name / "candidates").glob("g*/validation.json"))
    record = json.loads(parked[-1].read_text())
    assert not record["passed"]
    assert record["reasons"] == ["learning failed: singular matrix in the update"]
    assert record["frames"] == [first[i] for i in (1, 2, 4, 5)]
    events = line.client.xrange(line.streams.key("events"))
    assert any(b"singular matrix" in b"".join(f.values()) for _, f in events)

    monkeypatch.undo()  # the next confirmations are learned by the same, still running service
    for frame_id in later:  # the 7th confirmed normal is held back, the 8th learned
        confirm(line.client, line.name, frame_id, "normal")
    service.run(once=True)
    assert service.online.steps_ == 1
    assert service.state.applied == ids
