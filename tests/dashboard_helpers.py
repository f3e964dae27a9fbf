"""Helpers of the dashboard tests: score messages built by hand, a dashboard (consumer and web
server) running in threads against the session's real Redis, and plain HTTP calls to it."""

from __future__ import annotations

import http.client
import itertools
import json
import threading
from contextlib import contextmanager
from dataclasses import dataclass

from dashboard.consumer import ConsumerConfig, DashboardConsumer
from dashboard.server import DashboardServer
from dashboard.synthetic import ScoreFeed
from pipeline.connection import connect
from pipeline.schema import Message

_lines = itertools.count()


def score_message(frame_id: str, score: float, anomalous: bool | None = None, t: float = 1000.0,
                  model: int = 1, status: str = "ok", threshold: float = 3.0) -> Message:
    """A score message as the score stage writes it: captured at `t`, each stage 0.1 s apart."""
    stamps = {"capture": t + 0.01, "align": t + 0.11, "extract": t + 0.21, "score": t + 0.31}
    anomalous = score > threshold if anomalous is None else anomalous
    return Message("score", frame_id, "l", "cam", t,
                   {"score": score, "anomalous": anomalous, "threshold": threshold,
                    "status": status, "heatmap": None, "frame_shape": [64, 64]},
                   models={"align": model, "extract": model, "score": model},
                   timings={"align": 5.0, "extract": 40.0, "score": 20.0}, stamps=stamps)


def new_line(prefix: str = "dash") -> str:
    return f"{prefix}{next(_lines)}x{threading.get_ident() % 10_000}"


@dataclass
class Served:
    line: str
    consumer: DashboardConsumer
    server: DashboardServer
    feed: ScoreFeed

    @property
    def client(self):
        return self.consumer.client

    def call(self, method: str, path: str, body: bytes | dict | None = None,
             headers: dict | None = None) -> tuple[int, dict, bytes]:
        """One request: (status, headers, body)."""
        headers = dict(headers or {})
        if isinstance(body, dict):
            body = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        connection = http.client.HTTPConnection("127.0.0.1", self.server.server_address[1],
                                                timeout=10)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def get_json(self, path: str) -> dict:
        status, _, body = self.call("GET", path)
        assert status == 200, body
        return json.loads(body)


@contextmanager
def serving(url: str, line: str | None = None, token: str | None = None, **config):
    """A dashboard of a fresh line (or `line`) on a free port, for the duration of the block."""
    line = line or new_line()
    client = connect(url)
    settings = {"block_ms": 50, "poll_s": 0.2, "versions_s": 0.2, "gallery": 8} | config
    consumer = DashboardConsumer(client, url, line, ConsumerConfig(**settings))
    server = DashboardServer(consumer, "127.0.0.1", 0, token)
    consumer.address = server.url
    threads = [threading.Thread(target=consumer.run, daemon=True),
               threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                daemon=True)]
    for thread in threads:
        thread.start()
    assert consumer.ready.wait(timeout=20), "the dashboard did not start reading"
    try:
        yield Served(line, consumer, server, ScoreFeed(client, line))
    finally:
        consumer.stop_event.set()
        server.shutdown()
        server.server_close()
        threads[0].join(timeout=10)
