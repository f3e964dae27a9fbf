"""The stage runner's retry policy on a real Redis: a transient failure is retried (the entry stays
pending and is claimed again), a persistent one is dead-lettered after `max_deliveries`."""

from __future__ import annotations

import threading

import numpy as np
from streaming import Line, wait_for

from pipeline.runner import RunnerConfig, StageRunner
from pipeline.schema import Message
from stages.capture import publish_frame


class FailingSink:
    """A sink stage that raises RuntimeError for a frame until it has seen it `failures` times."""

    name, input, output, idempotent, model_version = "sink", "frames", None, False, None

    def __init__(self, failures: int):
        self.failures = failures
        self.seen: dict[str, int] = {}
        self.done: list[str] = []

    def ready(self) -> bool:
        return True

    def process(self, messages: list[Message]) -> list[None]:
        for message in messages:
            self.seen[message.frame_id] = self.seen.get(message.frame_id, 0) + 1
            if self.seen[message.frame_id] <= self.failures:
                raise RuntimeError(f"device busy ({message.frame_id})")
        self.done.extend(m.frame_id for m in messages)
        return [None] * len(messages)


def run_sink(line: Line, stage: FailingSink, until) -> StageRunner:
    runner = StageRunner(stage, line.client, line.streams, line.url,
                         RunnerConfig(block_ms=50, claim_idle_ms=100, claim_every_s=0.1,
                                      max_deliveries=3))
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        wait_for(until, timeout=30, what="the sink")
    finally:
        runner.stop_event.set()
        thread.join(timeout=10)
    return runner


def test_a_transient_failure_is_retried(redis_server) -> None:
    line = Line.create("retry", redis_server.url, None, None)
    publish_frame(line.client, line.name, image=np.zeros((40, 40, 3), np.uint8), frame_id="a")
    stage = FailingSink(failures=2)
    runner = run_sink(line, stage, lambda: stage.done)
    assert stage.done == ["a"] and stage.seen["a"] == 3
    assert runner.stats.retried == 2 and runner.stats.claimed == 2
    assert line.deadletters() == []
    assert line.client.xpending(line.streams.key("frames"), "sink")["pending"] == 0


def test_a_persistent_failure_is_dead_lettered_after_max_deliveries(redis_server) -> None:
    line = Line.create("giveup", redis_server.url, None, None)
    publish_frame(line.client, line.name, image=np.zeros((40, 40, 3), np.uint8), frame_id="b")
    stage = FailingSink(failures=99)
    run_sink(line, stage, lambda: line.deadletters())
    (dead,) = line.deadletters()
    assert stage.seen["b"] == 3
    assert dead["reason"].startswith("RuntimeError: device busy (b) at test_runner.py:")
    assert dead["reason"].endswith("(after 3 deliveries)") and dead["stage"] == "sink"
    assert line.client.xpending(line.streams.key("frames"), "sink")["pending"] == 0


def test_entries_trimmed_while_pending_are_dead_lettered_not_stuck(redis_server) -> None:
    line = Line.create("trimmed", redis_server.url, None, None)
    key = line.streams.key("frames")
    for index in range(12):
        publish_frame(line.client, line.name, image=np.zeros((40, 40, 3), np.uint8),
                      frame_id=f"t{index}")
    line.client.xgroup_create(key, "sink", id="0")
    line.client.xreadgroup("sink", "dead-worker", {key: ">"}, count=10)  # then it died
    line.client.xtrim(key, maxlen=2, approximate=False)  # MAXLEN drops 10 pending entries
    stage = FailingSink(failures=0)
    run_sink(line, stage, lambda: len(line.deadletters()) >= 10 and len(stage.done) >= 2)
    assert sorted(stage.done) == ["t10", "t11"]
    reasons = {d["reason"] for d in line.deadletters()}
    assert reasons == {"entry trimmed (MAXLEN) before it was processed; its payload is gone"}
    assert line.client.xpending(key, "sink")["pending"] == 0  # nothing stuck


def test_lag_counters_heal_when_entries_vanish_unread(redis_server) -> None:
    line = Line.create("drift", redis_server.url, None, None)
    key = line.streams.key("frames")
    for index in range(5):
        publish_frame(line.client, line.name, image=np.zeros((40, 40, 3), np.uint8),
                      frame_id=f"d{index}")
    line.client.xgroup_create(key, "align", id="0")
    line.client.xtrim(key, maxlen=0, approximate=False)  # gone before anyone read them
    assert line.streams.lag(line.client, "frames", "align") == 5
    line.streams.reconcile(line.client, "frames", "align")
    assert line.streams.lag(line.client, "frames", "align") == 0
