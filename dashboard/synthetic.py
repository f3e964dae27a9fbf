"""Synthetic score traffic for a line: what the score stage writes, without a model.

Benchmarks, tests and screenshots of the dashboard need score messages at rates no CPU model
reaches (thousands a second) with realistic envelopes: stamps and timings per stage, model
versions, heat maps for anomalies and the original frame in the frames stream (so overlays show a
picture), a few alignment failures. `ScoreFeed.publish` writes them in pipelined batches.
"""

from __future__ import annotations

import time
import uuid

import cv2
import numpy as np
import redis

from pipeline.schema import FIELD, Message, pack_array, pack_image
from pipeline.streams import DEFAULT_MAXLEN, Streams

STAGE_MS = {"align": 8.0, "extract": 40.0, "score": 15.0}  # typical work per frame on a CPU


class ScoreFeed:
    """Writes synthetic score messages to one line."""

    def __init__(self, client: redis.Redis, line: str, anomaly_rate: float = 0.1,
                 failure_rate: float = 0.01, threshold: float = 3.0, model: int = 1,
                 size: int = 256, seed: int = 0):
        self.client = client
        self.streams = Streams(line)
        self.anomaly_rate = anomaly_rate
        self.failure_rate = failure_rate
        self.threshold = threshold
        self.model = model
        self.shift = 0.0  # added to normal scores: set it to make the scores drift
        self.rng = np.random.default_rng(seed)
        self.count = 0
        self.prefix = uuid.uuid4().hex[:6]
        self._heatmaps = [_heatmap(self.rng, size) for _ in range(8)]
        self._frames = [_frame(self.rng, size) for _ in range(4)]

    def publish(self, count: int, captured_at: float | None = None) -> list[str]:
        """Write `count` score messages (one pipelined round trip); returns their frame ids."""
        now = time.time() if captured_at is None else captured_at
        draws = self._draws(count)
        frames = self._frame_entries(int(sum(draws["pictured"])), now)
        pipe = self.client.pipeline(transaction=False)
        ids = []
        for index in range(count):
            message = self._message({k: v[index] for k, v in draws.items()}, now, frames)
            pipe.xadd(self.streams.key("scores"), {FIELD: message.encode()},
                      maxlen=DEFAULT_MAXLEN["scores"], approximate=True)
            ids.append(message.frame_id)
        pipe.hincrby(self.streams.counters, "scores:added", count)
        pipe.execute()
        return ids

    def _draws(self, count: int) -> dict[str, list]:
        """Every random number of `count` messages at once (numpy per batch, not per message)."""
        rng = self.rng
        anomalous = rng.random(count) < self.anomaly_rate
        failed = anomalous & (rng.random(count) < self.failure_rate / max(self.anomaly_rate, 1e-9))
        normal = np.minimum(rng.normal(0.0, 1.0, count) + self.shift, self.threshold - 1e-3)
        score = np.where(anomalous, self.threshold + rng.gamma(2.0, 2.0, count), normal)
        return {"anomalous": anomalous.tolist(), "failed": failed.tolist(),
                "pictured": (anomalous & ~failed).tolist(), "score": score.tolist(),
                "latencies": rng.gamma(4.0, 0.01, (count, 4)).tolist(),  # s per hop
                "work": rng.uniform(0.8, 1.2, (count, len(STAGE_MS))).tolist()}

    def _frame_entries(self, count: int, now: float) -> list[str]:
        """Frames stream entries the anomalies point at (their overlays show these)."""
        if count == 0:
            return []
        pipe = self.client.pipeline(transaction=False)
        for index in range(count):
            frame = Message("frame", f"{self.prefix}-frame-{self.count + index}",
                            self.streams.line, "synthetic", now,
                            {"image": self._frames[index % len(self._frames)]})
            pipe.xadd(self.streams.key("frames"), {FIELD: frame.encode()},
                      maxlen=DEFAULT_MAXLEN["frames"], approximate=True)
        return [entry.decode() for entry in pipe.execute()]

    def _message(self, draw: dict, now: float, frames: list[str]) -> Message:
        self.count += 1
        stamps, t = {}, now
        for stage, latency in zip(("capture", *STAGE_MS), draw["latencies"], strict=True):
            t += latency
            stamps[stage] = t
        heatmap = None
        if draw["failed"]:
            score, status = float("inf"), "alignment_failed: too few keypoints"
        else:
            score, status = draw["score"], "ok"
            if draw["pictured"]:
                heatmap = self._heatmaps[self.count % len(self._heatmaps)]
        meta = {"entries": {"frames": frames.pop()}} if heatmap is not None and frames else {}
        timings = {stage: ms * factor for (stage, ms), factor in zip(STAGE_MS.items(), draw["work"],
                                                                      strict=True)}
        body = {"score": score, "anomalous": draw["anomalous"], "threshold": self.threshold,
                "status": status, "heatmap": heatmap, "frame_shape": [256, 256]}
        return Message("score", f"{self.prefix}-{self.count:07d}", self.streams.line, "synthetic",
                       now, body, dict.fromkeys(STAGE_MS, self.model), timings, stamps, meta)


def _heatmap(rng: np.random.Generator, size: int) -> dict:
    """A packed float16 heat map: low background, one hot blob."""
    y, x = np.mgrid[0:size, 0:size]
    cy, cx = rng.uniform(0.25, 0.75, 2) * size
    blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * (size / 14) ** 2))
    return pack_array((1.0 + 6.0 * blob + rng.normal(0, 0.2, (size, size))).astype(np.float16))


def _frame(rng: np.random.Generator, size: int) -> dict:
    """A PNG picture of a grey part on a dark background (what a camera might see)."""
    image = np.full((size, size, 3), 40, np.uint8)
    centre = (size // 2, size // 2)
    cv2.circle(image, centre, size // 3, (150, 150, 155), -1)
    cv2.circle(image, centre, size // 8, (60, 60, 65), -1)
    noisy = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    ok, data = cv2.imencode(".png", noisy)
    return pack_image(data.tobytes(), "png")
