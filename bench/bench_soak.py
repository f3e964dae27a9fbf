"""Soak test of a line under chaos: nothing lost, nothing doubled, only the intended poison
dead-lettered.

A line on an embedded Redis with AOF (fsync always), 2 workers per stage (align, extract,
score) started as `glad run` starts them, the online updater, and an external producer
(`publish_frame`, with its backpressure) sending `--frames` synthetic nut frames plus
`--poison` undecodable ones. Meanwhile:

- every `--kill-every` seconds (jittered) a random stage worker gets `kill -9` and is started
  again;
- Redis is killed (`kill -9`, no shutdown save) and restarted `--redis-restarts` times, spread
  over the run;
- an operator confirms scored normal frames, so the updater learns and publishes, and the
  updater gets `kill -9` once while it writes a candidate for publishing (else at a random
  moment), then is started again.

At the end it prints frames in, scores out (distinct frame ids), duplicates (score entries of a
frame id already scored), losses (frames neither scored nor dead-lettered) and dead letters
(poison and other); PASS when all are 0 except the intended poison.

    python3 bench/bench_soak.py                       # 10,000 frames (about an hour on 2 cores)
    python3 bench/bench_soak.py --frames 1000 --kill-every 3
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.run import RunOptions, start_stage_workers, stop_workers  # noqa: E402
from pipeline.connection import TRANSIENT, connect  # noqa: E402
from pipeline.embedded import EmbeddedRedis  # noqa: E402
from pipeline.feedback import confirm  # noqa: E402
from pipeline.registry import ModelRegistry  # noqa: E402
from pipeline.schema import decode_entry  # noqa: E402
from pipeline.streams import Streams, read_events  # noqa: E402
from stages.capture import publish_frame  # noqa: E402
from stages.sources import open_source  # noqa: E402

LINE = "soak"
SOURCE = "synth://nut?defect_rate=0.1&seed=3"
FIT_FRAMES = 24
DISTINCT_FRAMES = 64  # rendered once, sent round-robin under unique frame ids
STALL_S = 300.0  # give up when nothing is scored or dead-lettered for this long
POISON = b"\x89PNG\r\n\x1a\n this is not an image"
PIPELINE_HOPS = {Streams(LINE).key(hop) for hop in ("frames", "aligned", "features")}


def fit_model(path: Path) -> None:
    """A small model of the synthetic nut (small K: the soak is about delivery, not quality)."""
    from app.run import _first_normal_frames
    from glad.model import GladModel

    images, _ = _first_normal_frames(SOURCE, FIT_FRAMES)
    GladModel(max_components=32, max_iter=10, radius=1).fit(images).save(path)


class Chaos:
    """The workers of the line, and what kills them."""

    def __init__(self, options: RunOptions, url: str, server: EmbeddedRedis):
        self.options, self.url, self.server = options, url, server
        self.workers = start_stage_workers(options, url)
        self.updater = self._start_updater()
        self.kills = {"worker": 0, "redis": 0, "updater": 0, "updater_mid_publish": 0}
        self.rng = random.Random(0)

    def _start_updater(self) -> subprocess.Popen:
        log = (self.options.out / "logs" / "updater.log").open("a")
        return subprocess.Popen([sys.executable, "-m", "app.cli", "-v", "updater", "--line", LINE,
                                 "--redis-url", self.url, "--models", str(self.options.models)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def kill_a_worker(self) -> None:
        index = self.rng.randrange(len(self.workers))
        victim = self.workers[index]
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        log = (self.options.out / "logs" / f"restarted-{index}.log").open("a")
        self.workers[index] = subprocess.Popen(victim.args, stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL)
        self.kills["worker"] += 1

    def restart_redis(self) -> None:
        self.server.stop(kill=True)  # a crash: the AOF (fsync always) is all that survives
        self.server.start()
        self.kills["redis"] += 1

    def kill_the_updater(self, staging: Path, wait_s: float) -> None:
        """kill -9 the updater while its candidate folder exists (mid-publish), else after
        `wait_s`; start it again."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not any(staging.glob(".publish-*")):
            time.sleep(0.005)
        self.kills["updater_mid_publish"] += any(staging.glob(".publish-*"))
        os.kill(self.updater.pid, signal.SIGKILL)
        self.updater.wait()
        self.updater = self._start_updater()
        self.kills["updater"] += 1

    def stop(self) -> None:
        stop_workers([*self.workers, self.updater])


def produce(url: str, frames: int, poison: int, sent: list[str], stop: threading.Event) -> None:
    """Send the frames (unique ids) and the poison, retrying each through Redis outages."""
    with open_source(SOURCE) as source:
        pool = [frame for frame in itertools.islice(source, DISTINCT_FRAMES)]
    client = connect(url)
    poison_at = set(random.Random(1).sample(range(frames), poison))
    for index in range(frames):
        frame = pool[index % len(pool)]
        items = [("frame", f"soak-{index:06d}")] + ([("poison", f"poison-{index:06d}")]
                                                    if index in poison_at else [])
        for kind, frame_id in items:
            while not stop.is_set():
                try:
                    publish_frame(client, LINE, image=frame.image if kind == "frame" else None,
                                  encoded=POISON if kind == "poison" else None, frame_id=frame_id,
                                  meta={"label": frame.label or "normal"}, timeout=None)
                    sent.append(frame_id)
                    break
                except TRANSIENT:
                    time.sleep(0.2)


def operator(url: str, stop: threading.Event) -> None:
    """Confirm every 5th scored normal frame as normal, so the updater learns and publishes."""
    client = connect(url)
    streams, cursor, seen = Streams(LINE), "0", 0
    while not stop.is_set():
        try:
            reply = client.xread({streams.key("scores"): cursor}, count=100, block=500)
            for entry_id, fields in (reply[0][1] if reply else []):
                cursor = entry_id
                message = decode_entry(fields, "score")
                if message.meta.get("label") == "normal" and not message.body["anomalous"]:
                    seen += 1
                    if seen % 5 == 0:
                        confirm(client, LINE, message.frame_id, "normal", by="soak")
        except TRANSIENT:
            time.sleep(0.5)


def outcome(client, streams: Streams, sent: list[str]) -> dict:
    """The figures of the table, from the line's scores and dead-letter streams."""
    scores = [decode_entry(f).frame_id for _, f in client.xrange(streams.key("scores"))]
    dead = {frame_id for _, f in client.xrange(streams.key("deadletter"))
            if (frame_id := _dead_frame(f)) is not None}
    frames = {f for f in sent if f.startswith("soak-")}
    poison = {f for f in sent if f.startswith("poison-")}
    scored = set(scores)
    return {"frames_in": len(frames), "poison_in": len(poison), "scores_out": len(scored & frames),
            "duplicates": len(scores) - len(scored), "losses": len(frames - scored - dead),
            "deadletters_poison": len(dead & poison), "deadletters_other": len(dead - poison),
            "poison_scored": len(scored & poison)}


def _dead_frame(fields: dict) -> str | None:
    """The frame id of a dead letter parked by a pipeline stage (None for anything else: the
    updater's refused confirmations are feedback, not frames)."""
    import msgpack

    try:
        record = msgpack.unpackb(fields[b"m"], raw=False)
        if record["stream"] not in PIPELINE_HOPS:
            return None
        return decode_entry({b"m": record["payload"]}).frame_id
    except Exception:
        return None


def wait_until_settled(client, streams: Streams, sent: list[str]) -> dict:
    """Wait until every frame is scored or dead-lettered (or nothing moved for STALL_S)."""
    figures, progress, last_change = {}, None, time.monotonic()
    while time.monotonic() - last_change < STALL_S:
        try:
            figures = outcome(client, streams, sent)
        except TRANSIENT:
            time.sleep(1.0)
            continue
        if figures["losses"] == 0 and figures["deadletters_poison"] >= figures["poison_in"]:
            break
        if figures["losses"] != progress:
            progress, last_change = figures["losses"], time.monotonic()
        time.sleep(1.0)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=10_000)
    parser.add_argument("--poison", type=int, default=10)
    parser.add_argument("--kill-every", type=float, default=5.0, metavar="SECONDS")
    parser.add_argument("--redis-restarts", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="glad-soak-") as tmp:
        run(args, Path(tmp))


def run(args: argparse.Namespace, tmp: Path) -> None:
    print(f"fitting a small model on {FIT_FRAMES} frames ...", file=sys.stderr)
    fit_model(tmp / "model")
    server = EmbeddedRedis(tmp / "redis", persist=True).start()
    options = RunOptions(line=LINE, out=tmp / "run", models=tmp / "models", device="cpu",
                         scale={"align": 2, "extract": 2, "score": 2})
    (options.out / "logs").mkdir(parents=True)
    client = connect(server.url)
    streams = Streams(LINE)
    ModelRegistry(options.models, client, streams).publish(tmp / "model", note="soak")
    chaos = Chaos(options, server.url, server)
    stop, sent = threading.Event(), []
    threads = [threading.Thread(target=produce, args=(server.url, args.frames, args.poison, sent,
                                                      stop), daemon=True),
               threading.Thread(target=operator, args=(server.url, stop), daemon=True)]
    for thread in threads:
        thread.start()
    started = time.monotonic()
    restarts_at = [args.frames * (i + 1) // (args.redis_restarts + 1)
                   for i in range(args.redis_restarts)]
    updater_killed = False
    try:
        while threads[0].is_alive():
            time.sleep(args.kill_every * chaos.rng.uniform(0.5, 1.5))
            chaos.kill_a_worker()
            count = sum(f.startswith("soak-") for f in sent)
            if restarts_at and count >= restarts_at[0]:
                restarts_at.pop(0)
                chaos.restart_redis()
            if not updater_killed and count >= args.frames // 2:
                chaos.kill_the_updater(options.models / LINE / "updater", wait_s=60.0)
                updater_killed = True
            print(f"  {count} frames sent, kills {chaos.kills}", file=sys.stderr)
        figures = wait_until_settled(client, streams, sent)
        events = read_events(client, streams)
    finally:
        stop.set()
        chaos.stop()
        server.close()
    elapsed = time.monotonic() - started
    published = sum(1 for _, e in events if e.get("event") == "model_current")
    print(f"soak: {args.frames} frames + {args.poison} poison, 2 workers per stage, "
          f"{elapsed:.0f} s ({figures['frames_in'] / elapsed:.1f} frames/s)")
    print(f"chaos: {chaos.kills['worker']} worker kills, {chaos.kills['redis']} Redis restarts "
          f"(AOF), updater killed {chaos.kills['updater']} time(s) "
          f"({chaos.kills['updater_mid_publish']} mid-publish); {published} model pointer moves")
    print(f"{'what':28s} {'count':>8s}  expected")
    expected = {"frames_in": args.frames, "scores_out": args.frames, "duplicates": 0,
                "losses": 0, "deadletters_poison": args.poison, "deadletters_other": 0,
                "poison_scored": 0}
    for key, value in figures.items():
        if key == "poison_in":
            continue
        want = expected.get(key)
        print(f"{key:28s} {value:8d}  {want}{'' if value == want else '   <-- FAIL'}")
    ok = all(figures[k] == v for k, v in expected.items())
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
