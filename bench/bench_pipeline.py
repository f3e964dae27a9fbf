"""Throughput and latency of the streaming pipeline beside the library, on the same model.

One model (default backbone, EfficientNet-Lite0), fitted once with `GladModel()` defaults on the
first normal frames of the synthetic nut camera (seed 0; fit time excluded) or given with
`--model`. Test frames come from the same camera with seed 1, so none was trained on.

1. In-process: `GladModel.score` on batches of 8 (alignment, backbone, scoring: the library
   path), no Redis, in a child process with as many torch threads as cores. A frame's latency
   is the time of its batch (it waits for its batch).
2. Pipeline, saturated: an embedded Redis, the model published to a registry, the align,
   extract and score workers started as `glad run` starts them (`python -m app.cli stage
   NAME`, cores // 3 torch threads each), a capture worker at `--fps 0` (as fast as backpressure
   allows). Frames/s = scores completed after the 10th score / time from the 10th to the last;
   latency = score write time - capture time, over the frames after the 10th score.
3. Pipeline, paced: the same workers, a capture at 70 % of the saturated rate: the latency a
   user sees at a sustainable camera rate, and the rate achieved.

A warm-up capture of 16 frames first loads the model in every worker and traces the backbone,
so neither lands in the figures. Per-stage work time comes from the messages' timings; "queueing
+ transport" is the mean of latency minus the stages' work (it includes PNG encoding in the
capture, Redis hops, waiting for a batch and backpressure). The capture worker also renders the
synthetic frames (the camera's cost, measured in the in-process run): on a machine with few
cores it takes CPU from the model workers and counts against the pipeline.

    python3 bench/bench_pipeline.py                                # 300 frames, CPU
    python3 bench/bench_pipeline.py --frames 24 --fit-frames 12    # smoke run
    python3 bench/bench_pipeline.py --device cuda --json
    python3 bench/bench_pipeline.py --model glad-data/model        # an existing model, no fit
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing as mp
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from queue import Empty

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.run import (  # noqa: E402
    DEFAULT_SOURCE,
    PIPELINE_STAGES,
    RunOptions,
    start_capture,
    start_stage_workers,
    stop_workers,
)
from glad.modelfile import read_manifest  # noqa: E402
from pipeline.connection import connect  # noqa: E402
from pipeline.embedded import EmbeddedRedis  # noqa: E402
from pipeline.registry import ModelRegistry  # noqa: E402
from pipeline.results import score_record  # noqa: E402
from pipeline.schema import Message, decode_entry  # noqa: E402
from pipeline.streams import Streams  # noqa: E402

TEST_SOURCE = "synth://nut?defect_rate=0.1&seed=1"
LINE = "bench"
BATCH = 8  # in-process batch, and the stage workers' default read size
WARMUP_FRAMES = 16  # captured before the measured frames: model loading and the first trace
SKIP_SCORES = 10  # figures start at the 10th score of a phase
PACE = 0.7  # paced camera rate / saturated rate
STALL_S = 300.0  # give up when no score or dead letter arrives for this long
TARGET_OVERHEAD = 0.20


class BenchError(RuntimeError):
    """The benchmark cannot go on (a worker died, the line stalled, a child failed)."""


@dataclass
class Worker:
    name: str
    process: subprocess.Popen
    log: Path


# --- child processes: fitting and the in-process baseline ---------------------------------------


def fit_model(path: str, fit_frames: int, device: str, threads: int, queue) -> None:
    import torch

    from app.run import _first_normal_frames
    from glad.model import GladModel

    torch.set_num_threads(threads)
    images, _ = _first_normal_frames(DEFAULT_SOURCE, fit_frames)
    model = GladModel(device=device).fit(images)
    model.save(path)
    queue.put({"fit_images": len(images), "fit_s": model.fit_seconds_})


def score_in_process(path: str, frames: int, device: str, threads: int, queue) -> None:
    import torch

    from glad.model import GladModel
    from stages.sources import open_source

    torch.set_num_threads(threads)
    model = GladModel.load(path, device=device)
    started = time.perf_counter()
    with open_source(TEST_SOURCE) as source:
        images = [frame.image for frame in itertools.islice(source, WARMUP_FRAMES + frames)]
    render_ms = 1000.0 * (time.perf_counter() - started) / len(images)
    model.score(images[:BATCH])  # warm-up: the backbone's first trace
    batch_s, sizes = [], []
    for start in range(WARMUP_FRAMES, len(images), BATCH):
        batch = images[start:start + BATCH]
        started = time.perf_counter()
        model.score(batch)
        batch_s.append(time.perf_counter() - started)
        sizes.append(len(batch))
    latencies = np.repeat(1000.0 * np.array(batch_s), sizes)
    queue.put({"frames": frames, "fps": frames / sum(batch_s),
               "latency_p50_ms": float(np.percentile(latencies, 50)),
               "latency_p99_ms": float(np.percentile(latencies, 99)),
               "render_ms": render_ms, "threads": threads})


def _in_child(target: Callable, *args) -> dict:
    """`target(*args, queue)` in a spawned child process; returns what it put on the queue."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=target, args=(*args, queue), name=target.__name__)
    child.start()
    try:
        result = _result_of(child, queue)
    except BaseException:
        _terminate(child)
        raise
    child.join()
    return result


def _result_of(child: mp.Process, queue) -> dict:
    while child.is_alive():
        with contextlib.suppress(Empty):
            return queue.get(timeout=1.0)
    try:  # it may have put its result just before exiting
        return queue.get(timeout=1.0)
    except Empty:
        raise BenchError(f"{child.name} failed (exit status {child.exitcode}; its traceback "
                         "is above)") from None


def _terminate(child: mp.Process) -> None:
    child.terminate()
    child.join(timeout=10)
    if child.is_alive():
        child.kill()
        child.join()


# --- the pipeline -------------------------------------------------------------------------------


def run_pipeline(model: Path, frames: int, device: str, tmp: Path,
                 scale: dict[str, int] | None = None) -> dict:
    """Warm-up, saturated and paced phases on one embedded Redis and one set of stage workers."""
    embedded = EmbeddedRedis().start()
    workers: list[Worker] = []
    try:
        client = connect(embedded.url)
        streams = Streams(LINE)
        ModelRegistry(tmp / "models", client, streams).publish(model, note="bench_pipeline")
        options = RunOptions(source=TEST_SOURCE, line=LINE, out=tmp / "run", models=tmp / "models",
                             frames=WARMUP_FRAMES, fps=0.0, device=device, quiet=True,
                             scale=scale or {})
        options.out.mkdir(parents=True)
        logs = options.out / "logs"

        def stage_workers() -> list[Worker]:
            processes = start_stage_workers(options, embedded.url)
            processes.append(start_capture(options, embedded.url, 0))
            return [_worker(process, logs) for process in processes]

        def capture(label: str, fps: float, skip: int) -> Callable[[], list[Worker]]:
            return lambda: [_start_capture(embedded.url, logs / f"capture-{label}.log", frames,
                                           fps, skip)]

        _say(f"pipeline: warm-up ({WARMUP_FRAMES} frames: workers load the model)")
        _phase(client, streams, workers, WARMUP_FRAMES, stage_workers)
        _say(f"pipeline: saturated ({frames} frames, --fps 0)")
        saturated = _summary(*_phase(client, streams, workers, frames,
                                     capture("saturated", 0.0, WARMUP_FRAMES)), camera_fps=0.0)
        paced_fps = PACE * saturated["fps"]
        _say(f"pipeline: paced ({frames} frames, --fps {paced_fps:.2f})")
        paced = _summary(*_phase(client, streams, workers, frames,
                                 capture("paced", paced_fps, WARMUP_FRAMES + frames)),
                         camera_fps=paced_fps)
        threads = next(_option(w.process, "--threads") for w in workers if w.name in PIPELINE_STAGES)
    finally:
        stop_workers([worker.process for worker in workers])
        embedded.close()
    return {"saturated": saturated, "paced": paced, "worker_threads": int(threads)}


def _worker(process: subprocess.Popen, logs: Path) -> Worker:
    """A process from `start_stage_workers` / `start_capture` (logs in `logs/{stage}.log`)."""
    name = _option(process, "stage")
    return Worker(name, process, logs / f"{name}.log")


def _option(process: subprocess.Popen, flag: str) -> str:
    """The value after `flag` on a worker's command line."""
    return process.args[process.args.index(flag) + 1]


def _start_capture(url: str, log: Path, frames: int, fps: float, skip: int) -> Worker:
    """A capture worker, with the command line `glad run` gives it."""
    command = [sys.executable, "-m", "app.cli", "-v", "stage", "capture", "--line", LINE,
               "--redis-url", url, "--source", TEST_SOURCE, "--frames", str(frames),
               "--skip", str(skip), "--fps", f"{fps:.3f}", "--encoding", "png"]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    return Worker(log.stem, process, log)


def _phase(client, streams: Streams, workers: list[Worker], count: int,
           start: Callable[[], list[Worker]]) -> tuple[list[Message], int]:
    """Start what `start` starts, then read the scores stream until `count` frames are scored
    or dead-lettered; returns the score messages and the number of dead letters."""
    scores_key, dead_key = streams.key("scores"), streams.key("deadletter")
    newest = client.xrevrange(scores_key, count=1)
    after = newest[0][0] if newest else "0-0"
    dead_before = client.xlen(dead_key)
    workers.extend(start())
    messages: list[Message] = []
    dead, progress_at = 0, time.monotonic()
    while len(messages) + dead < count:
        reply = client.xread({scores_key: after}, count=count, block=500)
        for _, entries in reply:
            for entry_id, fields in entries:
                after = entry_id
                messages.append(decode_entry(fields, "score"))
        now_dead = client.xlen(dead_key) - dead_before
        if reply or now_dead != dead:
            progress_at = time.monotonic()
        dead = now_dead
        _check(workers)
        if time.monotonic() - progress_at > STALL_S:
            raise BenchError(f"no score for {STALL_S:.0f} s ({len(messages)} of {count} frames "
                             f"scored, {dead} dead-lettered)\n{_tails(workers)}")
    return messages, dead


def _check(workers: list[Worker]) -> None:
    """Raise with the end of its log when a worker failed (a capture may finish; no stage ends)."""
    for worker in workers:
        status = worker.process.poll()
        if status is None or (status == 0 and worker.name.startswith("capture")):
            continue
        raise BenchError(f"worker {worker.name} exited with status {status}; the end of its "
                         f"log:\n{_tail(worker.log)}")


def _tail(log: Path, lines: int = 20) -> str:
    text = log.read_text(errors="replace").splitlines() if log.exists() else ["(no log)"]
    return "\n".join("    " + line for line in text[-lines:])


def _tails(workers: list[Worker]) -> str:
    return "\n".join(f"  {worker.name} ({worker.log.name}):\n{_tail(worker.log, 5)}"
                     for worker in workers)


def _summary(messages: list[Message], dead: int, camera_fps: float) -> dict:
    """Sustained frames/s, latency percentiles and where the time goes, after the 10th score."""
    ordered = sorted(messages, key=lambda m: m.stamps["score"])
    if len(ordered) <= SKIP_SCORES:
        raise BenchError(f"only {len(ordered)} frames scored ({dead} dead-lettered): too few to "
                         f"skip {SKIP_SCORES} for warm-up")
    span = ordered[-1].stamps["score"] - ordered[SKIP_SCORES - 1].stamps["score"]
    records = [score_record(m) for m in ordered[SKIP_SCORES:]]
    latency = np.array([r["latency_ms"] for r in records])
    work = {stage: np.array([r["timings_ms"].get(stage, 0.0) for r in records])
            for stage in PIPELINE_STAGES}
    return {"frames": len(ordered), "measured": len(records), "deadlettered": dead,
            "camera_fps": camera_fps,
            "fps": len(records) / span if span > 0 else float("nan"),
            "latency_p50_ms": float(np.percentile(latency, 50)),
            "latency_p99_ms": float(np.percentile(latency, 99)),
            **{f"{stage}_ms": float(times.mean()) for stage, times in work.items()},
            "queue_ms": float((latency - sum(work.values())).mean())}


# --- report -------------------------------------------------------------------------------------


def _print_header(report: dict) -> None:
    base, fit = report["in_process"], report["fit"]
    before, after = report["load_average"]
    print(f"machine: {report['cores']} cores, load average {before:.2f} before / {after:.2f} after "
          "(the figures need an otherwise idle machine)")
    print(f"device {report['device']}, backbone {report['backbone']}, torch threads "
          f"{base['threads']} in-process / {report['worker_threads']} per model worker")
    print(f"model: {report['model']}" if not fit else
          f"model: fitted with GladModel() defaults on {fit['fit_images']} normal frames of "
          f"{DEFAULT_SOURCE} in {fit['fit_s']:.0f} s (not counted)")
    print(f"test frames: {TEST_SOURCE}, {WARMUP_FRAMES} warm-up + {report['frames']} per phase, "
          f"figures after the {SKIP_SCORES}th score; the synthetic camera renders "
          f"{base['render_ms']:.1f} ms/frame (in the pipeline's capture worker)\n")


def _print_table(report: dict) -> None:
    base, saturated, paced = report["in_process"], report["saturated"], report["paced"]
    header = f"{'':32s}{'in-process':>12s}{'pipeline sat.':>15s}{'pipeline paced':>16s}"
    print(header)
    print("-" * len(header))
    rows = [("capture --fps", None, "0", f"{paced['camera_fps']:.2f}"),
            ("frames/s", base["fps"], saturated["fps"], paced["fps"]),
            ("latency p50 (ms)", base["latency_p50_ms"], saturated["latency_p50_ms"],
             paced["latency_p50_ms"]),
            ("latency p99 (ms)", base["latency_p99_ms"], saturated["latency_p99_ms"],
             paced["latency_p99_ms"])]
    rows += [(f"{stage} work (ms/frame)", None, saturated[f"{stage}_ms"], paced[f"{stage}_ms"])
             for stage in PIPELINE_STAGES]
    rows += [("queueing + transport (ms/frame)", None, saturated["queue_ms"], paced["queue_ms"]),
             ("frames measured", base["frames"], saturated["measured"], paced["measured"]),
             ("dead-lettered", None, saturated["deadlettered"], paced["deadlettered"])]
    for label, *cells in rows:
        print(f"{label:32s}" + "".join(f"{_cell(c):>{w}s}" for c, w in zip(cells, (12, 15, 16),
                                                                             strict=True)))
    verdict = "PASS" if report["overhead"] <= TARGET_OVERHEAD else "FAIL"
    print(f"\npipeline saturated / in-process frames/s: {report['ratio']:.2f}")
    print(f"transport overhead max(0, 1 - ratio): {100 * report['overhead']:.0f} % "
          f"(target <= {100 * TARGET_OVERHEAD:.0f} %): {verdict}")


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.0f}" if isinstance(value, int) or abs(value) >= 100 else f"{value:.1f}"


def _command() -> str:
    """The command line as typed, the interpreter by its name (pyenv shims give a full path)."""
    return shlex.join([Path(sys.orig_argv[0]).name, *sys.orig_argv[1:]])


def _say(text: str) -> None:
    print(f"bench_pipeline: {text}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=300,
                        help="measured frames per phase (default %(default)s, at least 20)")
    parser.add_argument("--fit-frames", type=int, default=40,
                        help="normal frames to fit the model on (default %(default)s)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="torch device of the in-process run and the model workers")
    parser.add_argument("--model", type=Path, help="an existing model directory (no fitting)")
    parser.add_argument("--json", action="store_true", help="print a JSON object after the table")
    parser.add_argument("--scale", action="append", default=[], metavar="STAGE=N",
                        help="workers per stage, as `glad run --scale` (e.g. align=6 on a GPU "
                             "machine, where the CPU-bound alignment would cap extract+score)")
    args = parser.parse_args()
    if args.frames < 2 * SKIP_SCORES:
        parser.error(f"--frames must be at least {2 * SKIP_SCORES}")
    if args.model is not None and not (args.model / "manifest.json").is_file():
        parser.error(f"--model {args.model}: not a model directory (no manifest.json)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up below
    print(f"command: {_command()}", flush=True)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="glad-bench-") as tmp:
        try:
            report = _bench(args, Path(tmp))
        except BenchError as error:
            print(f"bench_pipeline: error: {error}", file=sys.stderr)
            sys.exit(1)
    report["load_average"] = [load_before, os.getloadavg()[0]]
    _print_header(report)
    _print_table(report)
    if args.json:
        print(json.dumps(report))


def _scale(items: list[str]) -> dict[str, int]:
    pairs = [item.partition("=") for item in items]
    return {stage: int(count) for stage, _, count in pairs}


def _bench(args: argparse.Namespace, tmp: Path) -> dict:
    cores = os.cpu_count() or 1
    model = args.model.resolve() if args.model else tmp / "model"
    fit = None
    if args.model is None:
        _say(f"fitting a model on {args.fit_frames} normal frames of {DEFAULT_SOURCE}")
        fit = _in_child(fit_model, str(model), args.fit_frames, args.device, cores)
    _say(f"in-process: GladModel.score on batches of {BATCH}, {args.frames} frames")
    base = _in_child(score_in_process, str(model), args.frames, args.device, cores)
    pipeline = run_pipeline(model, args.frames, args.device, tmp, _scale(args.scale))
    ratio = pipeline["saturated"]["fps"] / base["fps"]
    return {"command": _command(), "cores": cores, "device": args.device,
            "backbone": read_manifest(model)["backbone"]["name"],
            "model": str(args.model) if args.model else "fitted",
            "frames": args.frames, "warmup_frames": WARMUP_FRAMES, "skip_scores": SKIP_SCORES,
            "fit": fit, "in_process": base, **pipeline, "ratio": ratio,
            "overhead": max(0.0, 1.0 - ratio), "target_overhead": TARGET_OVERHEAD}


if __name__ == "__main__":
    main()
