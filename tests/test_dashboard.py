"""The dashboard: river statistics on real messages, the consumer and the HTTP API against a real
Redis (summary, series, gallery, overlay images, confirmations, Prometheus), its input checks
(tokens, path traversal, malformed bodies) and the `glad dashboard` command."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import cv2
import msgpack
import numpy as np
import pytest
from dashboard_helpers import score_message, serving
from streaming import REPO, wait_for

from app.cli import main
from dashboard.metrics import LineMetrics, Windows
from dashboard.server import DashboardServer
from glad.modelfile import MANIFEST
from pipeline.errors import PipelineError
from pipeline.registry import ModelRegistry
from pipeline.schema import FIELD, Message, decode_entry
from pipeline.streams import Streams, ensure_group

# --- statistics (no Redis) ------------------------------------------------------------------------


def test_metrics_count_rates_latencies_and_versions() -> None:
    metrics = LineMetrics("l")
    for i in range(100):
        status = "alignment_failed: no keypoints" if i % 25 == 0 else "ok"
        score = math.inf if status != "ok" else (5.0 if i % 10 == 1 else 0.1 * (i % 7))
        metrics.update(score_message(f"f{i}", score, status=status, t=1000.0 + i * 0.1,
                                     model=1 if i < 50 else 2), now=2000.0)
    snap = metrics.snapshot()
    assert (snap["frames"], snap["anomalies"], snap["alignment_failures"]) == (100, 14, 4)
    assert snap["anomaly_rate"] == pytest.approx(0.14)
    assert snap["alignment_failure_rate"] == pytest.approx(0.04)
    for stage in ("align", "extract", "score"):
        assert snap["latency"][stage]["quantiles"][0.5] == pytest.approx(0.1, abs=1e-6)
        assert snap["latency"][stage]["count"] == 100
    assert snap["frame_latency"]["quantiles"][0.99] == pytest.approx(0.31, abs=1e-6)
    assert snap["work"]["extract"] == pytest.approx(0.040)
    assert snap["scores"]["count"] == 96  # not-aligned frames have no finite score
    assert snap["by_version"] == {1: 50, 2: 50} and snap["model"] == 2 and snap["threshold"] == 3.0


def test_drift_alarm_on_a_score_shift_not_on_a_model_change() -> None:
    rng = np.random.default_rng(0)
    metrics = LineMetrics("l")

    def frames(prefix: str, count: int, model: int, offset: float, threshold: float) -> None:
        for i in range(count):  # normal parts and 10 % defects far above the threshold
            score = rng.normal(0, 1) if rng.random() > 0.1 else rng.normal(30, 10)
            metrics.update(score_message(f"{prefix}{i}", score + offset, t=i * 0.01, model=model,
                                         threshold=threshold))

    frames("a", 1500, model=1, offset=0.0, threshold=3.0)
    frames("b", 1500, model=2, offset=1.0, threshold=4.0)  # a new model: scores move on purpose
    assert metrics.snapshot()["drift"]["alarms"] == 0
    frames("c", 1500, model=2, offset=2.0, threshold=4.0)  # the same model's normal scores rise
    drift = metrics.snapshot()["drift"]
    assert drift["alarms"] >= 1
    assert drift["recent"][0]["mean_after"] > drift["recent"][0]["mean_before"]
    assert drift["recent"][0]["model"] == 2


def test_rolling_roc_auc_from_operator_verdicts() -> None:
    metrics = LineMetrics("l", Windows(labels=50))
    for i in range(40):
        metrics.update(score_message(f"f{i}", float(i)))

    def verdict(frame_id: str, value: str) -> None:
        metrics.feedback(Message("feedback", frame_id, "l", "", 0.0, {"verdict": value}))

    for i in range(10):
        verdict(f"f{i}", "normal")
    assert metrics.roc_auc() is None  # one class only
    for i in range(30, 40):
        verdict(f"f{i}", "anomalous")
    assert metrics.roc_auc() == pytest.approx(1.0)
    verdict("f35", "normal")  # a second verdict on a frame does not count twice
    verdict("f5", "anomalous")
    verdict("never-seen", "normal")
    snap = metrics.snapshot()
    assert snap["roc_auc"] == pytest.approx(1.0) and snap["labels"] == 20
    assert snap["feedback"] == {"normal": 12, "anomalous": 11} and snap["unmatched_feedback"] == 1
    assert metrics.verdicts["f35"] == "normal"  # the latest verdict is what the page shows


def test_series_points_per_second_and_bounded_memory() -> None:
    metrics = LineMetrics("l", Windows(series=50, remember=100, max_gap_s=20))
    for i in range(300):  # 3 s of frames, 100 a second, scored at t + 0.31
        metrics.update(score_message(f"f{i}", 0.5, t=999.695 + i / 100), now=2000.0)
    metrics.tick(1003.0)
    points = metrics.series_since(0)
    assert [p["t"] for p in points] == [1000, 1001, 1002] and [p["frames"] for p in points] == \
        [100, 100, 100]
    assert metrics.series_since(points[1]["seq"]) == points[2:]
    assert metrics.fps() == pytest.approx(100.0)
    metrics.tick(1005.0)
    assert [p["frames"] for p in metrics.series_since(points[-1]["seq"])] == [0, 0]
    metrics.tick(5000.0)  # a long silence: two empty points for it, not 4000
    assert len(metrics.series) == 7 and metrics.fps() == 0.0
    assert len(metrics.known) == 100


# --- consumer and API on a real Redis -------------------------------------------------------------


@pytest.fixture(scope="module")
def idle(redis_server):
    """One dashboard of a line without traffic, shared by the input-check tests."""
    with serving(redis_server.url) as served:
        yield served


def test_summary_series_gallery_and_overlay(redis_server) -> None:
    with serving(redis_server.url) as d:
        d.feed.publish(400)
        summary = wait_for(lambda: (s := d.get_json("/api/summary"))["frames"] == 400 and
                           s["lags"]["dashboard"]["lag"] == 0 and s,
                           what="400 frames in the summary", timeout=20)
        assert summary["line"] == d.line and summary["anomalies"] > 20
        assert summary["latency"]["score"]["quantiles"]["0.5"] > 0
        assert summary["lags"]["dashboard"] == {"hop": "scores", "lag": 0, "pending": 0}
        assert summary["writes_need_token"] is False
        wait_for(lambda: any(w["stage"] == "dashboard" and w["url"] == d.server.url
                             for w in d.get_json("/api/summary")["workers"]),
                 what="the dashboard's own heartbeat in the summary", timeout=20)
        series = wait_for(lambda: (p := d.get_json("/api/series?since=0"))["points"] and p,
                          what="a closed second")
        assert 0 < sum(p["frames"] for p in series["points"]) <= 400
        assert d.get_json(f"/api/series?since={series['seq']}")["points"] == []
        gallery = d.get_json("/api/gallery")
        assert len(gallery["items"]) == len(gallery["ids"]) == 8  # the ring keeps the latest 8
        newest = gallery["items"][0]
        assert newest["frame_id"] == gallery["ids"][-1] and newest["score"] > newest["threshold"]
        assert d.get_json(f"/api/gallery?since={gallery['seq']}")["items"] == []
        status, headers, body = d.call("GET", newest["image"])
        assert status == 200 and headers["Content-Type"] == "image/jpeg"
        picture = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
        assert picture.shape == (256, 512, 3)
        assert picture[:, :256].mean() > 40  # the original frame, fetched from the frames stream


def test_confirm_writes_the_feedback_stream(redis_server) -> None:
    with serving(redis_server.url) as d:
        d.feed.publish(200)
        wait_for(lambda: d.get_json("/api/summary")["frames"] == 200, what="the frames")
        item = d.get_json("/api/gallery")["items"][0]
        status, _, body = d.call("POST", "/api/confirm", {"frame_id": item["frame_id"],
                                                          "verdict": "normal", "note": "glare"})
        assert status == 200, body
        entries = d.client.xrange(Streams(d.line).key("feedback"))
        assert len(entries) == 1 and json.loads(body)["entry"] == entries[0][0].decode()
        message = decode_entry(entries[0][1], "feedback")
        assert (message.frame_id, message.body["verdict"], message.body["by"],
                message.body["note"]) == (item["frame_id"], "normal", "dashboard", "glare")
        gallery = wait_for(lambda: (g := d.get_json("/api/gallery"))["verdicts"] and g,
                           what="the verdict read back")
        assert gallery["verdicts"] == {item["frame_id"]: "normal"}
        assert d.get_json("/api/summary")["feedback"] == {"normal": 1}


@pytest.mark.parametrize(("body", "headers", "status", "error"), [
    (b"{not json", {"Content-Type": "application/json"}, 400, "not JSON"),
    (b"[1, 2]", {"Content-Type": "application/json"}, 400, "JSON object"),
    ({"frame_id": "x", "verdict": "maybe"}, {}, 400, "verdict must be one of"),
    ({"frame_id": "", "verdict": "normal"}, {}, 400, "frame_id must be"),
    ({"frame_id": "x", "verdict": "normal", "admin": True}, {}, 400, "unexpected fields"),
    ({"frame_id": "x" * 300, "verdict": "normal"}, {}, 400, "frame_id must be"),
    ({"frame_id": "never-scored", "verdict": "normal"}, {}, 404, "not scored recently"),
    (b'{"frame_id": "x"}', {"Content-Type": "text/plain"}, 415, "application/json"),
    (b"{" + b" " * 5000 + b"}", {"Content-Type": "application/json"}, 413, "body over"),
    ({"frame_id": "x", "verdict": "normal"}, {"Origin": "http://evil.example"}, 403, "cross-origin"),
])
def test_bad_confirmations_are_refused(idle, body, headers, status, error) -> None:
    got, _, answer = idle.call("POST", "/api/confirm", body, headers)
    assert got == status and error in json.loads(answer)["error"]
    assert idle.client.xlen(Streams(idle.line).key("feedback")) == 0


@pytest.mark.parametrize("path", [
    "/static/../app/run.py", "/static/..%2f..%2fpyproject.toml", "/static/",
    "/api/frames/..%2F..%2F..%2Fetc%2Fpasswd.jpg", "/api/frames/../../etc/passwd.jpg",
    "/static/%2e%2e/dashboard/server.py", "/api/frames/unknown.jpg", "/etc/passwd",
])
def test_no_path_traversal(idle, path) -> None:
    status, _, body = idle.call("GET", path)
    assert status == 404 and b"root:" not in body and b"import" not in body


def test_input_checks_on_reads(idle) -> None:
    assert idle.call("GET", "/api/series?since=-1")[0] == 400
    assert idle.call("GET", "/api/gallery?since=abc")[0] == 400
    status, _, body = idle.call("GET", "/api/summary", headers={"Host": "evil.example:80"})
    assert status == 400 and b"Host" in body  # DNS rebinding onto a loopback dashboard
    status, headers, page = idle.call("GET", "/")
    assert status == 200 and b"/static/app.js" in page
    assert "default-src 'self'" in headers["Content-Security-Policy"]


def test_writes_need_the_token_when_set(redis_server) -> None:
    with serving(redis_server.url, token="s3cret-token") as d:
        d.feed.publish(50)
        wait_for(lambda: d.get_json("/api/summary")["frames"] == 50, what="the frames")
        frame_id = d.feed.prefix + "-0000001"
        request = {"frame_id": frame_id, "verdict": "anomalous"}
        assert d.get_json("/api/summary")["writes_need_token"] is True
        assert d.call("POST", "/api/confirm", request)[0] == 401
        assert d.call("POST", "/api/confirm", request, {"X-Glad-Token": "guess"})[0] == 403
        assert d.call("POST", "/api/confirm", request, {"X-Glad-Token": "s3cret-token"})[0] == 200
        assert d.call("POST", "/api/confirm", request,
                      {"Authorization": "Bearer s3cret-token"})[0] == 200
        assert d.client.xlen(Streams(d.line).key("feedback")) == 2


def test_exposed_without_token_refuses_to_start(redis_server) -> None:
    with serving(redis_server.url) as d, pytest.raises(PipelineError, match="pass --token"):
        DashboardServer(d.consumer, "0.0.0.0", 0, None)


def test_prometheus_metrics(redis_server) -> None:
    with serving(redis_server.url) as d:
        streams = Streams(d.line)
        ensure_group(d.client, streams.key("frames"), "align")
        d.client.hincrby(streams.counters, "frames:added", 5)  # 5 frames the align stage lacks
        record = {"v": 1, "stage": "extract", "stream": streams.key("aligned"), "entry": "1-0",
                  "reason": "bad image", "error": "MessageError", "at": 0.0, "payload": b""}
        d.client.xadd(streams.key("deadletter"), {FIELD: msgpack.packb(record)})
        d.feed.publish(100)
        line = f'line="{d.line}"'
        expected = (
            f"glad_frames_total{{{line}}} 100.0",
            f'glad_stage_latency_seconds{{{line},quantile="0.5",stage="align"}}',
            f'glad_stage_latency_seconds_count{{{line},stage="score"}} 100.0',
            f'glad_frame_latency_seconds{{{line},quantile="0.99"}}',
            f'glad_consumer_lag{{{line},stage="align",stream="frames"}} 5.0',
            f'glad_consumer_lag{{{line},stage="dashboard",stream="scores"}}',
            f'glad_deadletters_total{{{line},stage="extract"}} 1.0',
            f'glad_score{{{line},quantile="0.99"}}', f"glad_anomaly_rate{{{line}}}",
            f'glad_model_frames_total{{{line},version="1"}} 100.0',
            "# TYPE glad_stage_latency_seconds summary",
        )
        wait_for(lambda: all(e in d.call("GET", "/metrics")[2].decode() for e in expected),
                 what="every expected metric", timeout=10)
        status, headers, _ = d.call("GET", "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")


def test_model_timeline_shows_provenance_and_validation(redis_server, pipeline_model,
                                                        tmp_path) -> None:
    model = pipeline_model  # the dashboard reads the registry's records, never the model
    manifest = json.loads((model / MANIFEST).read_text())
    with serving(redis_server.url) as d:
        registry = ModelRegistry(tmp_path / "models", d.client, Streams(d.line))
        registry.publish(model, note="fitted")
        registry.publish(model, note="online update", parent=1, provenance={
            "frames": [f"f{i}" for i in range(500)],
            "validation": {"far": 0.01, "recall": 0.97, "auroc": 0.99, "passed": True}})
        # the second version and the pointer's move to it arrive separately: wait for both
        versions = wait_for(lambda: (s := d.get_json("/api/summary"))["current_model"] == 2
                            and len(s["versions"]) == 2 and s["versions"][1]["current"]
                            and s["versions"], what="two versions, the second current")
        assert [v["note"] for v in versions] == ["fitted", "online update"]
        assert [v["current"] for v in versions] == [False, True]
        assert versions[1]["provenance"]["validation"]["recall"] == 0.97
        assert versions[0]["calibration"] == {
            "far": manifest["calibration"]["far"], "method": manifest["calibration"]["method"],
            "canary_recall": manifest["validation"]["recall"],
            "canary_auroc": manifest["validation"]["canary_auroc"]}
        assert versions[1]["provenance"]["frames"] == "[500 items]"  # long lists summarised
        assert len(versions[1]["became_current"]) == 1 and versions[1]["parent"] == 1
        assert d.get_json("/api/summary")["current_model"] == 2
        assert "path" not in versions[0]


def test_history_on_start_and_bounded_gallery(redis_server) -> None:
    with serving(redis_server.url, history_s=0) as first:
        first.feed.publish(3000)
        wait_for(lambda: first.get_json("/api/summary")["frames"] == 3000, what="3000 frames",
                 timeout=30)
        assert len(first.consumer.gallery.since(0)[1]) == 8
        anomalies = first.get_json("/api/summary")["anomalies"]
    with serving(redis_server.url, line=first.line, history_s=0) as fresh:
        assert fresh.get_json("/api/summary")["frames"] == 0  # only what comes next
    with serving(redis_server.url, line=first.line, history_s=600) as second:
        summary = wait_for(lambda: (s := second.get_json("/api/summary"))["frames"] == 3000 and
                           s["lags"]["dashboard"]["lag"] == 0 and s, what="the history")
        assert summary["anomalies"] == anomalies


# --- the command ----------------------------------------------------------------------------------


def test_glad_dashboard_command(redis_server) -> None:
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "app.cli", "dashboard", "--line", "cmd",
                                "--redis-url", redis_server.url, "--port", "0"], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = process.stdout.readline()
        assert first.startswith("glad dashboard: http://127.0.0.1:"), first + process.stderr.read()
        url = first.split()[2]
        import urllib.request

        with urllib.request.urlopen(url + "api/summary", timeout=10) as response:
            assert json.loads(response.read())["line"] == "cmd"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        process.kill()


def test_glad_dashboard_refuses_to_expose_without_token(redis_server, capsys) -> None:
    code = main(["dashboard", "--redis-url", redis_server.url, "--host", "0.0.0.0", "--token", ""])
    assert code == 2
    assert capsys.readouterr().err.strip().startswith("glad: error: --host 0.0.0.0 exposes")
