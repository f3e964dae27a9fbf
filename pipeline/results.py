"""Results of a run on disk: every score as JSON lines and CSV, a heat-map overlay per anomaly.

`ResultWriter` is a sink stage on the scores stream (its own consumer group, so it never takes
scores from another consumer). Overlays show the original frame (fetched from the frames stream
while it is still retained) beside the heat map.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
from collections import OrderedDict, deque
from pathlib import Path

import numpy as np
import redis

from glad.heatmap import save_overlay
from glad.images import resize_square
from pipeline.errors import MessageError
from pipeline.schema import Message, decode_entry, unpack_array, unpack_image
from pipeline.streams import Streams

log = logging.getLogger(__name__)

CSV_FIELDS = ("frame_id", "camera", "captured_at", "score", "anomalous", "threshold", "model",
              "status", "name", "label", "latency_ms")
SEEN_LIMIT = 100_000  # frame ids remembered to drop re-deliveries
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def score_record(message: Message) -> dict:
    """The flat record of a score message (what JSONL/CSV and the terminal show)."""
    body = message.body
    latency = (message.stamps.get("score", message.captured_at) - message.captured_at) * 1000.0
    return {"frame_id": message.frame_id, "camera": message.camera,
            "captured_at": message.captured_at,
            "score": body["score"] if math.isfinite(body["score"]) else None,  # JSON has no inf
            "anomalous": body["anomalous"], "threshold": body["threshold"],
            "model": message.models.get("score"), "status": body["status"],
            "name": message.meta.get("name"), "label": message.meta.get("label"),
            "latency_ms": round(latency, 2),
            "timings_ms": {k: round(v, 2) for k, v in message.timings.items()}}


class ResultWriter:
    """Sink stage: scores -> `out/scores.jsonl`, `out/scores.csv`, `out/heatmaps/*.png`."""

    name = "results"
    input = "scores"
    output = None
    idempotent = False
    model_version = None

    def __init__(self, out: str | Path, client: redis.Redis, streams: Streams,
                 heatmaps: bool = True):
        self.out = Path(out)
        self.client = client
        self.streams = streams
        self.heatmaps = heatmaps
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "heatmaps").mkdir(exist_ok=True)
        self._jsonl = (self.out / "scores.jsonl").open("a", buffering=1)
        new_csv = not (self.out / "scores.csv").exists()
        self._csv_file = (self.out / "scores.csv").open("a", newline="", buffering=1)
        self._csv = csv.DictWriter(self._csv_file, CSV_FIELDS, extrasaction="ignore")
        if new_csv:
            self._csv.writeheader()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.written = 0  # running figures for the run summary (bounded memory)
        self.anomalies = 0
        self.latencies: deque[float] = deque(maxlen=2000)

    def ready(self) -> bool:
        return True

    def process(self, messages: list[Message]) -> list[None]:
        for message in messages:
            if message.kind != "score":
                raise MessageError(f"expected a score message, got {message.kind!r}")
            if message.frame_id in self._seen:
                continue
            record = score_record(message)
            if self.heatmaps and message.body["heatmap"] is not None:
                record["heatmap"] = self._write_heatmap(message)
            self._jsonl.write(json.dumps(record) + "\n")
            self._csv.writerow(_csv_safe(record))
            self._seen[message.frame_id] = None  # only once written: a failure is retried
            if len(self._seen) > SEEN_LIMIT:
                self._seen.popitem(last=False)
            self.written += 1
            self.anomalies += bool(record["anomalous"])
            self.latencies.append(record["latency_ms"])
        return [None] * len(messages)

    def _write_heatmap(self, message: Message) -> str:
        path = self.out / "heatmaps" / f"{_safe(message.frame_id)}.png"
        frame, heatmap = anomaly_view(self.client, self.streams, message)
        save_overlay(path, frame, heatmap, message.body["threshold"])
        return str(path.relative_to(self.out))

    def close(self) -> None:
        self._jsonl.close()
        self._csv_file.close()


def anomaly_view(client: redis.Redis, streams: Streams, message: Message,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(frame, heat map) of an anomalous score message, ready for `glad.heatmap` overlays: the
    original frame at the heat map's size (black once the frames stream no longer holds it) and
    the float32 heat map. `MessageError` when the message carries no usable heat map."""
    heatmap = unpack_array(message.body["heatmap"], "heatmap", dtype="float16", ndim=2)
    if heatmap.shape[0] != heatmap.shape[1]:
        raise MessageError(f"heatmap: shape {list(heatmap.shape)} is not square")
    frame = frame_of(client, streams, message)
    if frame is None:
        frame = np.zeros((*heatmap.shape, 3), np.uint8)
    return resize_square(frame, heatmap.shape[0]), heatmap.astype(np.float32)


def frame_of(client: redis.Redis, streams: Streams, message: Message) -> np.ndarray | None:
    """The original frame of `message`, if the frames stream still holds it."""
    entry = (message.meta.get("entries") or {}).get("frames")
    if not isinstance(entry, str):
        return None
    found = client.xrange(streams.key("frames"), min=entry, max=entry)
    if not found:
        return None
    try:
        return unpack_image(decode_entry(found[0][1], "frame").body["image"])
    except MessageError:
        return None


def _safe(frame_id: str) -> str:
    """A file name for a frame id: its readable part (ids come from producers: no path
    separators survive) plus a digest of the whole id, so ids that read alike ("a/b", "a_b",
    two long ids with one prefix) never share a file."""
    readable = "".join(c if c.isalnum() or c in "-_." else "_" for c in frame_id)[:100].lstrip(".")
    return f"{readable or 'frame'}-{hashlib.sha256(frame_id.encode()).hexdigest()[:12]}"


def _csv_safe(record: dict) -> dict:
    """The record with text cells that a spreadsheet would run as a formula (starting with
    = + - @, a tab or a carriage return) quoted by a leading apostrophe (OWASP's advice)."""
    return {key: "'" + value if isinstance(value, str) and value[:1] in FORMULA_STARTS else value
            for key, value in record.items()}
