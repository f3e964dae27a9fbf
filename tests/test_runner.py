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


def test_a_rotated_password_ends_the_worker_with_one_line(tmp_path, caplog) -> None:
    """Issue 13, hole 6: credentials Redis no longer accepts cannot be fixed by retrying; the
    worker used to log thousands of "reconnecting" lines a second and never exit."""
    import logging
    import socket

    import pytest
    import redis

    from pipeline.connection import connect
    from pipeline.embedded import EmbeddedRedis
    from pipeline.errors import RedisUnavailableError

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with EmbeddedRedis(tmp_path / "redis", port=port) as server:
        admin = redis.Redis(unix_socket_path=str(server.socket))
        admin.config_set("requirepass", "before")
        url = f"redis://:before@127.0.0.1:{port}/0"
        line = Line.create("rotated", url, None, None)
        stage = FailingSink(failures=0)
        runner = StageRunner(stage, connect(url), line.streams, url, RunnerConfig(block_ms=50))
        failure: list[Exception] = []

        def work() -> None:
            try:
                runner.run()
            except RedisUnavailableError as error:
                failure.append(error)

        thread = threading.Thread(target=work, daemon=True)
        with caplog.at_level(logging.WARNING):
            thread.start()
            wait_for(lambda: line.client.hlen(line.streams.workers) == 1, what="the worker")
            admin.auth("before")
            admin.config_set("requirepass", "after")
            admin.client_kill_filter(_type="normal", skipme=True)  # every client reconnects
            thread.join(timeout=60)
        assert not thread.is_alive(), "the worker kept running on refused credentials"
        assert failure and "refused the credentials" in str(failure[0])
        assert "before" not in str(failure[0])  # the password never reaches a log line
        reconnects = [r for r in caplog.records if "reconnecting" in r.getMessage()]
        assert len(reconnects) <= 3
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(url).ping()
