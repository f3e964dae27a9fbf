"""Streaming statistics of one production line, with river: no Redis, no threads, bounded memory.

`LineMetrics.update(message)` folds in one score message (learn_one style): counts, per-stage
latency p50/p99, rolling score quantiles, anomaly and alignment-failure rates, score drift
(ADWIN on the scores clipped at the decision threshold, so that the few huge scores of defects do
not swamp the mean; reset when the model version changes, since a new model moves the scores on
purpose).
`feedback(message)` pairs an operator's verdict with the frame's score for a rolling ROC AUC;
`deadletter(record)` counts dead letters by stage. Every second closes one point of the chart
series. `snapshot()` returns plain data for the JSON API and Prometheus.
"""

from __future__ import annotations

import math
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass

from river import drift, metrics, stats, utils

from pipeline.schema import Message

# Pipeline stages in order and the stamp each one's latency starts from: a stage's latency is the
# time from the previous stage's write to its own (queueing, transport and work).
STAGES = {"align": "capture", "extract": "align", "score": "extract"}
LATENCY_QUANTILES = (0.5, 0.99)
SCORE_QUANTILES = (0.5, 0.9, 0.99)
FPS_WINDOW_S = 5  # frames/s is the mean of the last closed seconds


@dataclass(frozen=True)
class Windows:
    """How much each rolling statistic remembers."""

    messages: int = 1000  # latency and score quantiles, anomaly and failure rates
    labels: int = 500  # operator verdicts in the rolling ROC AUC
    remember: int = 50_000  # frame id -> score, so late feedback finds its score
    series: int = 3600  # one chart point per second
    alarms: int = 100  # drift alarms kept for display
    max_gap_s: int = 600  # idle seconds filled with empty chart points at most


class Latency:
    """Rolling p50/p99 (river) plus count and sum (Prometheus summaries), in seconds."""

    def __init__(self, window: int):
        self.quantiles = {q: stats.RollingQuantile(q, window) for q in LATENCY_QUANTILES}
        self.count = 0
        self.sum = 0.0

    def update(self, seconds: float) -> None:
        for quantile in self.quantiles.values():
            quantile.update(seconds)
        self.count += 1
        self.sum += seconds

    def snapshot(self) -> dict:
        return {"quantiles": {q: s.get() for q, s in self.quantiles.items()}, "count": self.count,
                "sum": self.sum}


class LineMetrics:
    """What the dashboard knows about a line, updated one message at a time."""

    def __init__(self, line: str, windows: Windows | None = None):
        self.line = line
        self.windows = w = windows or Windows()
        self.frames = 0
        self.anomalies = 0
        self.alignment_failures = 0
        self.latency = {stage: Latency(w.messages) for stage in STAGES}
        self.frame_latency = Latency(w.messages)  # capture to score
        self.work: dict[str, stats.EWMean] = {}  # stage -> seconds of work per frame
        self.scores = {q: stats.RollingQuantile(q, w.messages) for q in SCORE_QUANTILES}
        self.score_count = 0
        self.score_sum = 0.0
        self.anomaly_rate = utils.Rolling(stats.Mean, window_size=w.messages)
        self.failure_rate = utils.Rolling(stats.Mean, window_size=w.messages)
        self.detector = drift.ADWIN()
        self.alarms: deque[dict] = deque(maxlen=w.alarms)
        self.alarm_count = 0
        self.auc = metrics.RollingROCAUC(window_size=w.labels)
        self.labels: deque[bool] = deque(maxlen=w.labels)  # the AUC's window: both kinds needed
        self.feedback_counts: Counter[str] = Counter()
        self.unmatched_feedback = 0  # verdicts on frames this dashboard never saw (or forgot)
        self.known: OrderedDict[str, float] = OrderedDict()  # frame id -> score
        self.verdicts: OrderedDict[str, str] = OrderedDict()  # frame id -> operator verdict
        self.deadletters: Counter[str] = Counter()  # by stage
        self.by_version: Counter[int] = Counter()  # frames scored per model version
        self.model: int | None = None  # version that scored the latest frame
        self.threshold: float | None = None
        self.lag = 0  # frames in flight in the pipeline, set by the consumer's poller
        self.series: deque[dict] = deque(maxlen=w.series)
        self._seq = 0
        self._second: int | None = None  # the open chart bucket
        self._bucket = Counter()

    # --- learning -------------------------------------------------------------------------------

    def update(self, message: Message, now: float | None = None) -> None:
        """Fold in one score message."""
        now = time.time() if now is None else now
        body = message.body
        stamps = {k: t for k, v in message.stamps.items() if (t := _seconds(v)) is not None}
        self._advance(int(min(stamps.get("score", now), now)))
        self.frames += 1
        anomalous = bool(body["anomalous"])
        failed = body["status"].startswith("alignment_failed")
        self.anomalies += anomalous
        self.alignment_failures += failed
        self.anomaly_rate.update(anomalous)
        self.failure_rate.update(failed)
        self._bucket["frames"] += 1
        self._bucket["anomalies"] += anomalous
        self._bucket["failures"] += failed
        self._latencies(message, stamps)
        version = message.models.get("score")
        if isinstance(version, int) and not isinstance(version, bool):
            if version != self.model and self.model is not None:
                self.detector = drift.ADWIN()  # a new model shifts scores on purpose
            self.model = version
            self.by_version[version] += 1
        self.threshold = float(body["threshold"])
        score = float(body["score"])
        self.known[message.frame_id] = score
        if len(self.known) > self.windows.remember:
            self.known.popitem(last=False)
        if math.isfinite(score):
            self._score(message, score, now)

    def _latencies(self, message: Message, stamps: dict[str, float]) -> None:
        for stage, previous in STAGES.items():
            if stage in stamps and previous in stamps:
                self.latency[stage].update(max(0.0, stamps[stage] - stamps[previous]))
            work = _seconds(message.timings.get(stage))
            if work is not None:
                self.work.setdefault(stage, stats.EWMean(0.05)).update(work / 1000.0)
        if "score" in stamps:
            self.frame_latency.update(max(0.0, stamps["score"] - message.captured_at))

    def _score(self, message: Message, score: float, now: float) -> None:
        for quantile in self.scores.values():
            quantile.update(score)
        self.score_count += 1
        self.score_sum += score
        before = self.detector.estimation
        self.detector.update(min(score, self.threshold))
        if self.detector.drift_detected:
            self.alarm_count += 1
            self._bucket["alarms"] += 1
            self.alarms.append({"at": now, "frame_id": message.frame_id, "model": self.model,
                                "mean_before": before, "mean_after": self.detector.estimation})

    def feedback(self, message: Message) -> None:
        """Fold in one operator verdict (a feedback message): the first verdict on a frame the
        dashboard has scored joins the rolling ROC AUC (a defect is the positive class)."""
        verdict = message.body["verdict"]
        self.feedback_counts[verdict] += 1
        first = message.frame_id not in self.verdicts
        self.verdicts[message.frame_id] = verdict
        if len(self.verdicts) > self.windows.remember:
            self.verdicts.popitem(last=False)
        score = self.known.get(message.frame_id)
        if score is None:
            self.unmatched_feedback += 1
        elif first:
            self.auc.update(verdict == "anomalous", score)
            self.labels.append(verdict == "anomalous")

    def deadletter(self, record: dict) -> None:
        """Count one dead-letter record by the stage that gave up on it."""
        stage = record.get("stage")
        self.deadletters[stage if isinstance(stage, str) and len(stage) <= 32 else "unknown"] += 1

    def tick(self, now: float | None = None) -> None:
        """Close the chart points of the seconds that have passed (also while no frame comes)."""
        self._advance(int(time.time() if now is None else now))

    def _advance(self, second: int) -> None:
        if self._second is None:
            self._second = second
        if second <= self._second:
            return
        gap = second - self._second
        if gap > self.windows.max_gap_s:  # a long silence: one point for it, not thousands
            self._close()
            self._second = second - 1
        while self._second < second:
            self._close()
            self._second += 1

    def _close(self) -> None:
        self._seq += 1
        latency = self.frame_latency.snapshot()["quantiles"]
        self.series.append({
            "seq": self._seq, "t": self._second, "frames": self._bucket["frames"],
            "anomalies": self._bucket["anomalies"], "failures": self._bucket["failures"],
            "alarms": self._bucket["alarms"], "lag": self.lag, "threshold": self.threshold,
            **{f"score_p{round(q * 100)}": s.get() for q, s in self.scores.items()},
            "latency_p50": latency[0.5], "latency_p99": latency[0.99]})
        self._bucket = Counter()

    # --- reading --------------------------------------------------------------------------------

    def fps(self) -> float:
        """Frames per second over the last closed seconds (at most `FPS_WINDOW_S`)."""
        if not self.series:
            return 0.0
        latest = self.series[-1]["t"]
        recent = [p["frames"] for p in reversed(self.series) if p["t"] > latest - FPS_WINDOW_S]
        seconds = min(FPS_WINDOW_S, latest - self.series[0]["t"] + 1)
        return sum(recent) / seconds

    def roc_auc(self) -> float | None:
        """Rolling ROC AUC of scores against operator verdicts; None until the window holds
        both normals and defects."""
        positives = sum(self.labels)
        if positives == 0 or positives == len(self.labels):
            return None
        return float(self.auc.get())

    def series_since(self, seq: int) -> list[dict]:
        """Chart points after sequence number `seq`, oldest first."""
        return [p for p in self.series if p["seq"] > seq]

    def snapshot(self) -> dict:
        """Everything above as plain data (seconds for times; None where nothing was seen)."""
        return {
            "line": self.line, "frames": self.frames, "anomalies": self.anomalies,
            "alignment_failures": self.alignment_failures, "fps": self.fps(),
            "anomaly_rate": self.anomaly_rate.get() if self.frames else None,
            "alignment_failure_rate": self.failure_rate.get() if self.frames else None,
            "latency": {stage: s.snapshot() for stage, s in self.latency.items()},
            "frame_latency": self.frame_latency.snapshot(),
            "work": {stage: s.get() for stage, s in self.work.items()},
            "scores": {"quantiles": {q: s.get() for q, s in self.scores.items()},
                       "count": self.score_count, "sum": self.score_sum},
            "threshold": self.threshold, "model": self.model, "by_version": dict(self.by_version),
            "drift": {"detector": "ADWIN", "alarms": self.alarm_count,
                      "recent": list(self.alarms), "mean": self.detector.estimation
                      if self.score_count else None},
            "feedback": dict(self.feedback_counts), "unmatched_feedback": self.unmatched_feedback,
            "roc_auc": self.roc_auc(), "labels": len(self.labels),
            "deadletters": dict(self.deadletters), "lag": self.lag,
        }


def _seconds(value) -> float | None:
    """A finite number from a message's stamps or timings (written by other programs), else None."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None
