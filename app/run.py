"""`glad run`: the whole pipeline on one machine, from one command.

Starts (or connects to) Redis, makes sure the line has a model (publishes `--model`, or fits one
on the source's first normal frames), starts one worker process per stage (`glad stage NAME`,
exactly what compose.yaml runs), the online updater (`glad updater`) and the dashboard
(`glad dashboard`, on localhost), writes results to the output directory and shows a live summary
until the source ends (or Ctrl-C). Workers' logs go to `OUT/logs/`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import redis

from app.options import DEFAULT_DASHBOARD_PORT
from glad.images import decode_image
from glad.manifest import read_manifest
from pipeline.connection import TRANSIENT, connect, redact, redis_url
from pipeline.embedded import EmbeddedRedis, line_store
from pipeline.errors import PipelineError, RedisUnavailableError
from pipeline.registry import ModelRegistry
from pipeline.results import ResultWriter
from pipeline.runner import RunnerConfig, StageRunner
from pipeline.streams import Streams, heartbeats, read_events
from stages.sources import open_source

log = logging.getLogger(__name__)

DEFAULT_SOURCE = "synth://nut?defect_rate=0.1&seed=0"
PIPELINE_STAGES = ("align", "extract", "score")
DRAIN_TIMEOUT = 120.0  # s to wait for in-flight frames after the source ended
LOAD_TIMEOUT = 300.0  # s for the stage workers to load the model
PROGRESS_EVERY = 4.0  # s: the longest silence while waiting for workers
DASHBOARD_TIMEOUT = 60.0  # s for the dashboard to serve its page


@dataclass
class RunOptions:
    source: str = DEFAULT_SOURCE
    model: Path | None = None
    line: str = "line1"
    out: Path = Path("glad-data/run")
    models: Path = Path("glad-data/models")
    frames: int = 300  # frames to capture (0 = until the source ends / Ctrl-C)
    fps: float = 0.0
    loop: bool = False
    fit_frames: int = 40
    redis_url: str | None = None
    fresh: bool = False  # forget the embedded line's state (models stay on disk)
    device: str = "cpu"
    scale: dict[str, int] = field(default_factory=dict)
    encoding: str = "png"
    quiet: bool = False
    dashboard: bool = True
    updater: bool = True  # learn from confirmations (dashboard buttons, glad confirm)
    dashboard_port: int | None = None  # None: the dashboard's default port, else a free one


@dataclass
class Baseline:
    """Counts of the line before this run started (a line's streams outlive runs), and the
    epoch of the line's data in Redis: a new epoch means Redis lost the data (a restart without
    persistence) and the counts started again from zero."""

    added: int
    deadletters: int
    last_event: str
    epoch: str

    @classmethod
    def now(cls, client, streams: Streams) -> Baseline:
        events = client.xrevrange(streams.key("events"), count=1)
        return cls(int(client.hget(streams.counters, "frames:added") or 0),
                   int(client.xlen(streams.key("deadletter"))),
                   events[0][0].decode() if events else "0", _epoch(client, streams))

    def follow_reset(self, client, streams: Streams, summary: Summary) -> None:
        """When the line's data was lost, carry the counts on: what this run published and
        dead-lettered before the loss stays counted."""
        epoch = _epoch(client, streams)
        if epoch == self.epoch:
            return
        log.warning("Redis lost the line's data (restarted without persistence?): %d frames "
                    "published so far, counting on from there", summary.published)
        self.added, self.deadletters = -summary.published, -summary.deadletters
        self.epoch = epoch


def _epoch(client, streams: Streams) -> str:
    """The line's data epoch in Redis, created when missing (SET NX: one per loss)."""
    client.set(streams.epoch, uuid.uuid4().hex, nx=True)
    return client.get(streams.epoch).decode()


@dataclass
class Summary:
    """What the live terminal line and the final report show."""

    published: int = 0
    scored: int = 0
    anomalies: int = 0
    deadletters: int = 0
    latencies: list[float] = field(default_factory=list)
    model: int | None = None
    dashboard: str | None = None  # the dashboard's URL
    started: float = field(default_factory=time.monotonic)
    printed: float = 0.0

    def fps(self) -> float:
        return self.scored / max(1e-9, time.monotonic() - self.started)

    def percentile(self, q: float) -> float:
        recent = self.latencies[-2000:]
        return float(np.percentile(recent, q)) if recent else float("nan")

    def line(self) -> str:
        return (f"frames {self.published}  scored {self.scored}  {self.fps():.1f} fps  "
                f"latency p50 {self.percentile(50):.0f} ms p99 {self.percentile(99):.0f} ms  "
                f"anomalies {self.anomalies}  dead-letter {self.deadletters}  model v{self.model}")

    def to_dict(self) -> dict:
        return {"frames": self.published, "scored": self.scored, "anomalies": self.anomalies,
                "deadletter": self.deadletters, "fps": round(self.fps(), 2),
                "latency_p50_ms": round(self.percentile(50), 1),
                "latency_p99_ms": round(self.percentile(99), 1), "model_version": self.model,
                "seconds": round(time.monotonic() - self.started, 1), "dashboard": self.dashboard}


def run_pipeline(options: RunOptions) -> Summary:
    """Run everything until the source ends (or Ctrl-C / SIGTERM); returns the final summary."""
    previous = signal.signal(signal.SIGTERM, _interrupt)  # so `finally` stops workers and Redis
    try:
        return _run(options)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def _run(options: RunOptions) -> Summary:
    if options.model is not None:
        read_manifest(options.model)  # a clear error for a missing or broken model, before anything starts
    open_source(options.source).close()  # likewise for a source that cannot be opened
    options.out.mkdir(parents=True, exist_ok=True)
    url = redis_url(options.redis_url)
    embedded = None
    if url is None:
        # the line persists beside the model folders; the next run (and glad status) resume it
        store = line_store(options.models)
        if options.fresh:
            shutil.rmtree(store, ignore_errors=True)
        embedded = EmbeddedRedis(store, persist=True).start()
        url = embedded.url
        _say(options, f"embedded Redis at {url}")
    workers: list[subprocess.Popen] = []
    try:
        client = connect(url)
        streams = Streams(options.line)
        registry = ModelRegistry(options.models, client, streams)
        if options.fresh and embedded is not None:
            registry.forget_current()
        skip = _ensure_model(options, registry)
        baseline = Baseline.now(client, streams)
        workers = start_stage_workers(options, url)
        if options.updater:
            workers.append(_spawn(options, "updater", ["updater", "--line", options.line,
                                                       "--redis-url", url, "--models",
                                                       str(options.models)]))
        dashboard = start_dashboard(options, url) if options.dashboard else None
        wait_until_serving(client, streams, workers, on_progress=lambda ready, total: _say(
            options, f"{ready} of {total} workers have loaded the model"))
        address = None
        if dashboard is not None:
            workers.append(dashboard)  # stopped with the others
            address = wait_for_dashboard(client, streams, dashboard)
            _say(options, f"dashboard at {address}")
        workers.append(start_capture(options, url, skip))
        return _follow(options, client, streams, url, registry, workers, baseline, address,
                       embedded)
    except TRANSIENT as error:  # Redis went away between the steps that wait it out
        _check_embedded(embedded)
        raise RedisUnavailableError(f"lost Redis at {redact(url)}: {error}") from None
    finally:
        stop_workers(workers)
        if embedded is not None:
            embedded.close()


def _ensure_model(options: RunOptions, registry: ModelRegistry) -> int:
    """Publish `--model`, keep the line's current model, or fit one on the first normal frames;
    returns how many source frames were used for fitting (capture skips them)."""
    if options.model is not None:
        version = registry.publish(options.model, note=f"glad run --model {options.model}")
        _say(options, f"model {options.model} published as version {version} of line "
                      f"{options.line}")
        return 0
    current = registry.current() or registry.restore()
    if current is not None:
        _say(options, f"line {options.line} serves model version {current}")
        return 0
    from glad.model import GladModel

    images, used = _first_normal_frames(options.source, options.fit_frames)
    _say(options, f"fitting a model on the first {len(images)} normal frames of {options.source} "
                  "(pass --model to use your own)")
    model = GladModel(device=options.device, progress=not options.quiet).fit(images)
    with tempfile.TemporaryDirectory() as tmp:
        model.save(Path(tmp) / "model")
        version = registry.publish(Path(tmp) / "model", note=f"fitted by glad run on {len(images)} "
                                                             f"frames of {options.source}")
    _say(options, f"model version {version} published (threshold {model.threshold_:.2f}, "
                  f"fit {model.fit_seconds_:.0f} s)")
    return used


def _first_normal_frames(source: str, count: int) -> tuple[list[np.ndarray], int]:
    """Up to `count` frames not labelled as defects, and how many frames were read."""
    images, used = [], 0
    with open_source(source) as frames:
        for frame in frames:
            used += 1
            if frame.label not in (None, "normal"):
                continue
            images.append(frame.image if frame.image is not None else decode_image(frame.encoded))
            if len(images) >= count:
                break
    if len(images) < 2:
        raise PipelineError(f"{source} gave {len(images)} normal frames: not enough to fit a model")
    return images, used


def start_stage_workers(options: RunOptions, url: str) -> list[subprocess.Popen]:
    """align, extract and score workers (more with --scale), each `glad stage NAME`; alignment
    runs in OpenCV on the CPU, so only extract and score get `--device`."""
    heavy = sum(options.scale.get(s, 1) for s in PIPELINE_STAGES)
    threads = max(1, (os.cpu_count() or 1) // heavy)
    workers: list[subprocess.Popen] = []
    try:
        for stage in PIPELINE_STAGES:
            device = "cpu" if stage == "align" else options.device
            for replica in range(options.scale.get(stage, 1)):
                workers.append(_spawn(options, stage + (f"-{replica}" if replica else ""), [
                    "stage", stage, "--line", options.line, "--redis-url", url, "--models",
                    str(options.models), "--device", device, "--threads", str(threads)]))
    except BaseException:
        stop_workers(workers)
        raise
    return workers


def start_capture(options: RunOptions, url: str, skip: int) -> subprocess.Popen:
    """The capture worker, `glad stage capture`."""
    return _spawn(options, "capture", [
        "stage", "capture", "--line", options.line, "--redis-url", url, "--source", options.source,
        "--frames", str(options.frames), "--skip", str(skip), "--fps", str(options.fps),
        "--encoding", options.encoding] + (["--loop"] if options.loop else []))


def start_dashboard(options: RunOptions, url: str) -> subprocess.Popen:
    """`glad dashboard` on localhost: on `--dashboard-port`, else on its default port, or on a
    free one when that is taken (another run's dashboard, say)."""

    port = options.dashboard_port
    if port is None:
        port = DEFAULT_DASHBOARD_PORT if _port_free(DEFAULT_DASHBOARD_PORT) else 0
    return _spawn(options, "dashboard", ["dashboard", "--line", options.line, "--redis-url", url,
                                         "--port", str(port)])


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_for_dashboard(client, streams: Streams, dashboard: subprocess.Popen,
                       timeout: float = DASHBOARD_TIMEOUT) -> str:
    """The dashboard's URL, once its heartbeat shows it serving."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in heartbeats(client, streams).values():
            if record.get("pid") == dashboard.pid and record.get("url"):
                return record["url"]
        if dashboard.poll() is not None:
            raise PipelineError(f"the dashboard exited with status {dashboard.returncode}: see "
                                "logs/dashboard.log in the run's folder (--dashboard-port picks "
                                "another port, --no-dashboard runs without it)")
        time.sleep(0.2)
    raise PipelineError(f"the dashboard did not serve within {timeout:.0f} s")


def wait_until_serving(client, streams: Streams, workers: list[subprocess.Popen],
                       timeout: float = LOAD_TIMEOUT,
                       on_progress: Callable[[int, int], None] | None = None) -> None:
    """Block until every worker's heartbeat shows a loaded model (so the first frames do not
    wait for model loading); a worker that exits meanwhile is an error. `on_progress(serving,
    total)` hears each change of the count, and the count again after PROGRESS_EVERY seconds
    without one (so a long wait is never silent)."""
    pids = {worker.pid for worker in workers}
    deadline = time.monotonic() + timeout
    reported, reported_at = None, 0.0
    while time.monotonic() < deadline:
        serving = {record.get("pid") for record in heartbeats(client, streams).values()
                   if record.get("model") is not None}
        now = time.monotonic()
        if on_progress is not None and (len(pids & serving) != reported
                                        or now - reported_at >= PROGRESS_EVERY):
            reported, reported_at = len(pids & serving), now
            on_progress(reported, len(pids))
        if pids <= serving:
            return
        _check_alive(workers)
        time.sleep(0.2)
    raise PipelineError(f"workers did not load the model within {timeout:.0f} s")


def _spawn(options: RunOptions, name: str, args: list[str]) -> subprocess.Popen:
    """`glad -v ARGS...` as a child process, its output in OUT/logs/NAME.log."""
    logs = options.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / f"{name}.log").open("w") as log_file:
        return subprocess.Popen([sys.executable, "-m", "app.cli", "-v", *args],
                                stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def _check_alive(workers: list[subprocess.Popen]) -> None:
    dead = [w for w in workers if w.poll() is not None and w.returncode != 0]
    if dead:
        command = dead[0].args[dead[0].args.index("-v") + 1:]
        name = command[1] if command[0] == "stage" else command[0]
        raise PipelineError(f"the {name} worker exited with status {dead[0].returncode}: see "
                            f"its log in the run's logs/ folder")


def _follow(options: RunOptions, client, streams: Streams, url: str, registry: ModelRegistry,
            workers: list[subprocess.Popen], baseline: Baseline, dashboard: str | None,
            embedded: EmbeddedRedis | None = None) -> Summary:
    """Write results and show the summary until every captured frame is accounted for; an
    embedded Redis that dies ends the run with an error (nothing would ever restart it)."""
    writer = ResultWriter(options.out, client, streams)
    with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: the line's results group exists
        client.xgroup_create(streams.key("scores"), writer.name, id="$", mkstream=True)
    runner = StageRunner(writer, client, streams, url, RunnerConfig(batch_size=32, block_ms=200),
                         consumer="results-run")
    thread = threading.Thread(target=runner.run, daemon=True, name="results")
    thread.start()
    summary = Summary(dashboard=dashboard)
    ended_at, interrupted = None, False
    _say(options, f"running line {options.line}: results in {options.out} "
                  f"(Ctrl-C to stop)")
    try:
        while True:
            time.sleep(0.5)
            _check_embedded(embedded)
            try:
                ended = ended_at is not None or _source_ended(client, streams, baseline)
                _update(summary, writer, client, streams, registry, baseline)
            except TRANSIENT as error:  # the workers wait Redis out; so does the summary
                log.warning("summary: Redis unreachable (%s)", error)
                continue
            _show(options, summary)
            if not thread.is_alive():
                raise PipelineError("the results writer stopped; see the log above")
            if ended and ended_at is None:
                ended_at = time.monotonic()
            if ended and summary.scored + summary.deadletters >= summary.published:
                break
            if ended_at is not None and time.monotonic() - ended_at > DRAIN_TIMEOUT:
                log.warning("gave up waiting for %d in-flight frames",
                            summary.published - summary.scored - summary.deadletters)
                break
            _check_alive(workers)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        runner.stop_event.set()
        thread.join(timeout=10)
        writer.close()
        with contextlib.suppress(*TRANSIENT):
            _update(summary, writer, client, streams, registry, baseline)
        if not options.quiet and sys.stderr.isatty():
            print(file=sys.stderr)
    (options.out / "summary.json").write_text(json.dumps(summary.to_dict() | {
        "line": options.line, "source": options.source, "redis": redact(url),
        "interrupted": interrupted}, indent=2))
    return summary


def _check_embedded(embedded: EmbeddedRedis | None) -> None:
    status = None if embedded is None else embedded.exit_status()
    if status is not None:
        raise PipelineError(f"the embedded Redis server exited (status {status}); the run "
                            "cannot go on: results so far are in the output folder, and the "
                            f"line's state in {embedded.run_dir}")


def _update(summary: Summary, writer: ResultWriter, client, streams: Streams,
            registry: ModelRegistry, baseline: Baseline) -> None:
    baseline.follow_reset(client, streams, summary)
    summary.scored = writer.written
    summary.anomalies = writer.anomalies
    summary.latencies = list(writer.latencies)
    summary.published = int(client.hget(streams.counters, "frames:added") or 0) - baseline.added
    summary.deadletters = int(client.xlen(streams.key("deadletter"))) - baseline.deadletters
    summary.model = registry.current() or registry.restore()


def _source_ended(client, streams: Streams, baseline: Baseline) -> bool:
    return any(record.get("event") == "source_ended"
               for _, record in read_events(client, streams, after=baseline.last_event))


def _show(options: RunOptions, summary: Summary) -> None:
    if options.quiet:
        return
    if sys.stderr.isatty():
        print("\r" + summary.line().ljust(110), end="", file=sys.stderr, flush=True)
    elif time.monotonic() - summary.printed >= 5.0:
        summary.printed = time.monotonic()
        print(summary.line(), file=sys.stderr, flush=True)


def stop_workers(workers: list[subprocess.Popen]) -> None:
    """SIGTERM (workers finish their batch and acknowledge it), then SIGKILL after 15 s."""
    for worker in workers:
        if worker.poll() is None:
            worker.terminate()
    deadline = time.monotonic() + 15
    for worker in workers:
        try:
            worker.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def _say(options: RunOptions, text: str) -> None:
    if not options.quiet:
        print(f"glad run: {text}", file=sys.stderr, flush=True)

