"""How many frames/s one Redis node carries, against the frame's size: the sizing figure of
docs/deployment.md.

A frame crosses four streams (frames, aligned, features, scores); per frame this writes and
reads what the pipeline does: the encoded frame (`--sizes`, bytes), the aligned image (raw
256x256x3, 196,608 B), the features (EfficientNet-Lite0's three layers in float16, 336,896 B)
and a score message (a heat map for 10 % of frames: 131,072 B, else 1 kB). Each hop is XADD in
a transaction with its counter, XREADGROUP by a consumer group and XACK, from one client per
hop in this process, on an embedded redis-server (AOF fsync always, as `glad run` keeps it, and
without AOF). Frames/s is what Redis sustains for the whole chain, before any model work.

    python3 bench/bench_redis_node.py
    python3 bench/bench_redis_node.py --frames 500 --sizes 65536,1048576
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.connection import connect  # noqa: E402
from pipeline.embedded import EmbeddedRedis  # noqa: E402
from pipeline.streams import Streams, ensure_group  # noqa: E402

ALIGNED = 256 * 256 * 3
FEATURES = 2 * (24 * 64 * 64 + 40 * 32 * 32 + 112 * 16 * 16)
SCORE_ANOMALY, SCORE_NORMAL, ANOMALY_SHARE = 256 * 256 * 2, 1024, 0.1
BATCH = 8


def per_frame(frame_bytes: int) -> list[int]:
    score = int(ANOMALY_SHARE * SCORE_ANOMALY + (1 - ANOMALY_SHARE) * SCORE_NORMAL)
    return [frame_bytes, ALIGNED, FEATURES, score]


def carry(client, streams: Streams, sizes: list[int], frames: int) -> float:
    """Seconds to push `frames` frames through the four hops, batch by batch."""
    hops = ["frames", "aligned", "features", "scores"]
    for hop in hops:
        ensure_group(client, streams.key(hop), "bench")
    payloads = [os.urandom(size) for size in sizes]
    started = time.perf_counter()
    for first in range(0, frames, BATCH):
        count = min(BATCH, frames - first)
        for hop, payload in zip(hops, payloads, strict=True):
            pipe = client.pipeline(transaction=True)
            for _ in range(count):
                pipe.xadd(streams.key(hop), {b"m": payload}, maxlen=256, approximate=True)
            pipe.hincrby(streams.counters, f"{hop}:added", count)
            pipe.execute()
            reply = client.xreadgroup("bench", "c", {streams.key(hop): ">"}, count=count)
            ids = [entry_id for entry_id, _ in reply[0][1]]
            client.xack(streams.key(hop), "bench", *ids)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--sizes", default="65536,262144,1048576,4194304",
                        help="encoded frame sizes in bytes, comma-separated")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"{'frame (kB)':>10s} {'per frame (kB)':>15s} {'AOF fsync always':>17s} "
          f"{'no AOF':>8s}   frames/s; MB/s through Redis")
    for size in sizes:
        row = []
        for persist in (True, False):
            with EmbeddedRedis(persist=persist) as server:
                client = connect(server.url)
                seconds = carry(client, Streams(f"size{size}"), per_frame(size), args.frames)
                row.append(args.frames / seconds)
        total = sum(per_frame(size)) / 1e3
        print(f"{size / 1e3:10.0f} {total:15.0f} {row[0]:11.0f} ({row[0] * total / 1e3:4.0f}) "
              f"{row[1]:6.0f} ({row[1] * total / 1e3:4.0f})")
    print(f"load average: {', '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"cores: {os.cpu_count()}")


if __name__ == "__main__":
    main()
