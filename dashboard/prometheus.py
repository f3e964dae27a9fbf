"""Prometheus exposition of the dashboard's statistics (`/metrics`).

A custom collector turns one `DashboardConsumer.summary()` into metric families at scrape time,
so the statistics live in one place (river, in `LineMetrics`) and a scrape costs one snapshot.
Names follow Prometheus conventions: base units (seconds), `_total` counters, summaries with
`quantile` labels, and `line` / `stage` / `verdict` / `version` labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)


class LineCollector:
    """Collector of one line's summary (`source` returns `DashboardConsumer.summary()`)."""

    def __init__(self, source: Callable[[], dict]):
        self.source = source

    def collect(self) -> Iterator[Metric]:
        s = self.source()
        line = {"line": s["line"]}
        yield _counter("glad_frames", "Frames scored (score messages read by the dashboard).", line,
                       s["frames"])
        yield _counter("glad_anomalies", "Frames scored as anomalous.", line, s["anomalies"])
        yield _counter("glad_alignment_failures", "Frames that could not be aligned.", line,
                       s["alignment_failures"])
        yield _gauge("glad_frames_per_second", "Frames scored per second (last seconds).", line,
                     s["fps"])
        yield _gauge("glad_anomaly_rate", "Share of anomalous frames (rolling window).", line,
                     s["anomaly_rate"])
        yield _gauge("glad_alignment_failure_rate", "Share of frames not aligned (rolling window).",
                     line, s["alignment_failure_rate"])
        stages = _summary("glad_stage_latency_seconds", "Time from the previous stage's write to "
                          "this stage's write: queueing, transport and work (rolling quantiles).")
        for stage, latency in s["latency"].items():
            _add_summary(stages, line | {"stage": stage}, latency)
        yield stages
        frame = _summary("glad_frame_latency_seconds", "Capture to score (rolling quantiles).")
        _add_summary(frame, line, s["frame_latency"])
        yield frame
        work = GaugeMetricFamily("glad_stage_work_seconds", "Work per frame of each stage "
                                 "(exponentially weighted mean).", labels=["line", "stage"])
        for stage, seconds in s["work"].items():
            work.add_metric([s["line"], stage], seconds)
        yield work
        scores = _summary("glad_score", "Anomaly scores of the frames that were scored (rolling "
                          "quantiles).")
        _add_summary(scores, line, s["scores"])
        yield scores
        yield _gauge("glad_score_threshold", "Decision threshold of the latest scoring model.",
                     line, s["threshold"])
        yield _counter("glad_score_drift_alarms", "Score drift alarms (ADWIN).", line,
                       s["drift"]["alarms"])
        yield _gauge("glad_roc_auc", "Rolling ROC AUC of scores against operator verdicts.", line,
                     s["roc_auc"])
        feedback = CounterMetricFamily("glad_feedback", "Operator verdicts read from the feedback "
                                       "stream.", labels=["line", "verdict"])
        for verdict, count in sorted(s["feedback"].items()):
            feedback.add_metric([s["line"], verdict], count)
        yield feedback
        lag = GaugeMetricFamily("glad_consumer_lag", "Entries not yet delivered to a consumer "
                                "group (stage = group).", labels=["line", "stage", "stream"])
        pending = GaugeMetricFamily("glad_consumer_pending", "Entries delivered to a consumer group "
                                    "and not yet acknowledged.", labels=["line", "stage", "stream"])
        for group, info in sorted(s["lags"].items()):
            lag.add_metric([s["line"], group, info["hop"]], info["lag"])
            pending.add_metric([s["line"], group, info["hop"]], info["pending"])
        yield lag
        yield pending
        dead = CounterMetricFamily("glad_deadletters", "Dead letters read since the dashboard's "
                                   "history start, by the stage that gave up.",
                                   labels=["line", "stage"])
        for stage, count in sorted(s["deadletters"].items()):
            dead.add_metric([s["line"], stage], count)
        yield dead
        yield _gauge("glad_model_version", "The line's current model version.", line,
                     s["current_model"])
        by_version = CounterMetricFamily("glad_model_frames", "Frames scored by each model version.",
                                         labels=["line", "version"])
        for version, count in sorted(s["by_version"].items()):
            by_version.add_metric([s["line"], str(version)], count)
        yield by_version
        workers = GaugeMetricFamily("glad_workers", "Workers with a fresh heartbeat, by stage.",
                                    labels=["line", "stage"])
        healthy: dict[str, int] = {}
        for worker in s["workers"]:
            stage = str(worker.get("stage"))
            healthy[stage] = healthy.get(stage, 0) + bool(worker.get("healthy"))
        for stage, count in sorted(healthy.items()):
            workers.add_metric([s["line"], stage], count)
        yield workers
        yield _counter("glad_dashboard_skipped", "Stream entries the dashboard could not decode.",
                       line, s["skipped"])


def build_registry(source: Callable[[], dict]) -> CollectorRegistry:
    """A registry of its own (not the process-global one) holding the line's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LineCollector(source))
    return registry


def _counter(name: str, doc: str, labels: dict, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def _gauge(name: str, doc: str, labels: dict, value: float | None) -> GaugeMetricFamily:
    """A gauge; no sample at all while the value is unknown (None)."""
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    if value is not None:
        family.add_metric(list(labels.values()), value)
    return family


def _summary(name: str, doc: str) -> Metric:
    return Metric(name, doc, "summary")


def _add_summary(family: Metric, labels: dict, stats: dict) -> None:
    """Quantile samples (those known so far), `_count` and `_sum`."""
    for quantile, value in stats["quantiles"].items():
        if value is not None:
            family.add_sample(family.name, labels | {"quantile": str(quantile)}, value)
    family.add_sample(family.name + "_count", labels, stats["count"])
    family.add_sample(family.name + "_sum", labels, stats["sum"])
