"""Helpers of the streaming tests: a line with a published model, stage runners in threads or
in real worker processes, and waiting on Redis conditions."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import redis

from pipeline.connection import connect
from pipeline.registry import ModelFollower, ModelRegistry
from pipeline.runner import RunnerConfig, StageRunner
from pipeline.schema import decode_entry
from pipeline.streams import Streams

REPO = Path(__file__).resolve().parents[1]


def with_threshold_moved(model_dir: Path, shift: float, out: Path) -> Path:
    """A copy of a saved model whose threshold (and its calibration) is `shift` higher, saved as
    the library saves models (an edited manifest would fail its content hash)."""
    from glad.model import GladModel

    model = GladModel.load(model_dir)
    model.threshold_ += shift
    model.calibration_ = replace(model.calibration_, threshold=model.threshold_)
    return model.save(out)


@dataclass
class Line:
    name: str
    url: str
    models: Path
    client: redis.Redis

    @classmethod
    def create(cls, name: str, url: str, models: Path, model_dir: Path | None) -> Line:
        line = cls(name, url, models, connect(url))
        if model_dir is not None:
            line.registry().publish(model_dir, note="test")
        return line

    @property
    def streams(self) -> Streams:
        return Streams(self.name)

    def registry(self) -> ModelRegistry:
        return ModelRegistry(self.models, self.client, self.streams)

    def entries(self, hop: str) -> list:
        return [decode_entry(fields) for _, fields in
                self.client.xrange(self.streams.key(hop))]

    def deadletters(self) -> list[dict]:
        import msgpack

        return [msgpack.unpackb(fields[b"m"], raw=False)
                for _, fields in self.client.xrange(self.streams.key("deadletter"))]

    def stage(self, name: str, **config) -> StageRunner:
        """A runner of a pipeline stage in this process (its own client)."""
        from stages.align import AlignStage
        from stages.extract import ExtractStage
        from stages.score import ScoreStage

        client = connect(self.url)
        follower = ModelFollower(ModelRegistry(self.models, client, self.streams))
        stage = {"align": AlignStage, "extract": ExtractStage, "score": ScoreStage}[name](follower)
        settings = {"block_ms": 100, "claim_every_s": 0.5} | config
        return StageRunner(stage, client, self.streams, self.url, RunnerConfig(**settings))

    @contextmanager
    def running(self, *names: str, **config):
        """Stage runners in threads for the duration of the block; yields the runners."""
        runners = [self.stage(name, **config) for name in names]
        threads = [threading.Thread(target=r.run, daemon=True) for r in runners]
        for thread in threads:
            thread.start()
        try:
            yield runners
        finally:
            for runner in runners:
                runner.stop_event.set()
            for thread in threads:
                thread.join(timeout=30)

    def worker(self, name: str, *args: str, log: Path | None = None) -> subprocess.Popen:
        """`glad stage NAME` as a real process."""
        command = [sys.executable, "-m", "app.cli", "-v", "stage", name, "--line", self.name,
                   "--redis-url", self.url, "--models", str(self.models), "--threads", "1", *args]
        out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
        return subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env=os.environ | {"PYTHONUNBUFFERED": "1"})


def wait_for(condition, timeout: float = 60.0, interval: float = 0.05, what: str = "condition"):
    """Poll `condition()` until truthy; fail the test with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
