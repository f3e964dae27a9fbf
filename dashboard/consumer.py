"""The dashboard's reader of a line's streams: scores and events through its own consumer group,
feedback and dead letters by cursor; it feeds `LineMetrics` and the gallery, polls lag, workers
and model versions once a second, and answers the web server from memory.

It is a monitor, not a pipeline stage, so it does not run under `StageRunner`: it reads with
NOACK (no pending-entry list to grow, nothing to claim: a dashboard that dies loses a few
statistics, never a frame), writes nothing to the pipeline's streams, and starts `history_s`
seconds back (stream ids are times, so its group starts there at no cost and the read loop
catches up in batches: charts fill at once, and a restart after a long stop never replays more
than that). It counts what its group was delivered, so its lag shows beside the stages'.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import msgpack
import redis

from dashboard.gallery import Gallery
from dashboard.metrics import LineMetrics, Windows
from dashboard.pictures import Pictures
from dashboard.plain import plain
from pipeline.errors import MessageError
from pipeline.feedback import confirm, verdict_of
from pipeline.registry import DEFAULT_ROOT, ModelRegistry
from pipeline.schema import Message, decode_entry
from pipeline.service import Service
from pipeline.streams import PIPELINE_GROUPS, STALE_AFTER_S, Streams, as_text, beat, ensure_group, heartbeats

log = logging.getLogger(__name__)

LAG_HOPS = ("frames", "aligned", "features", "scores")  # streams whose groups' lag is shown
MAX_ITEMS, MAX_TEXT = 20, 300  # records other programs write (events, provenance) are cut to this


@dataclass
class ConsumerConfig:
    """What the dashboard reads and keeps."""

    group: str = "dashboard"
    history_s: float = 300.0  # seconds of scores, feedback and dead letters read back at start
    gallery: int = 32  # latest anomalies kept with their heat maps
    batch: int = 500
    block_ms: int = 200
    poll_s: float = 1.0  # lag, workers, current model
    versions_s: float = 5.0  # the registry's version records
    events: int = 50  # recent events and dead letters kept for display
    render_per_s: float = 10.0  # gallery pictures made ahead of requests at most (0: on request)
    windows: Windows = field(default_factory=Windows)


class DashboardConsumer(Service):
    """Reads one line into memory; every public method is safe to call from server threads."""

    name = "dashboard"

    def __init__(self, client: redis.Redis, url: str, line: str,
                 config: ConsumerConfig | None = None):
        super().__init__(client, url)
        self.streams = Streams(line)
        self.config = config or ConsumerConfig()
        self.metrics = LineMetrics(line, self.config.windows)
        self.gallery = Gallery(self.config.gallery)
        self.pictures = Pictures(client, self.streams, self.gallery)
        self.registry = ModelRegistry(DEFAULT_ROOT, client, self.streams)  # records only, no files
        self.worker = f"dashboard-{socket.gethostname()}-{os.getpid()}"
        self.address: str | None = None  # the page's URL, in the heartbeat once serving
        self.ready = threading.Event()  # set once the groups and cursors are in place
        self.skipped = 0  # entries that could not be decoded
        self.started = time.time()
        self._lock = threading.Lock()
        self._scores = self.streams.key("scores")
        self._events = self.streams.key("events")
        self._cursors: dict[str, str] = {}  # feedback and dead-letter streams, read by XREAD
        self._lags: dict[str, dict] = {}
        self._workers: list[dict] = []  # heartbeats, as `glad status` shows them
        self._current: int | None = None
        self._versions: list[dict] = []
        self._became_current: dict[int, deque[float]] = {}
        self._recent_events: deque[dict] = deque(maxlen=self.config.events)
        self._recent_deadletters: deque[dict] = deque(maxlen=self.config.events)
        self._polled = 0.0
        self._versions_polled = 0.0
        self._caught_up = False

    # --- the reading loop -----------------------------------------------------------------------

    def run(self) -> None:
        """Read until `stop_event` is set; waits Redis out (see `pipeline.service.Service`)."""
        if self.config.render_per_s > 0:
            threading.Thread(target=self.pictures.render_ahead, name="dashboard-pictures",
                             args=(self.config.render_per_s, self.stop_event), daemon=True).start()
        super().run()

    def bootstrap(self) -> None:
        self._setup(first=not self.ready.is_set())
        self.ready.set()

    def teardown(self) -> None:
        self.client.hdel(self.streams.workers, self.worker)

    def _setup(self, first: bool) -> None:
        """Groups on scores and events; on the first start, also where reading starts."""
        ensure_group(self.client, self._scores, self.config.group)
        ensure_group(self.client, self._events, self.config.group)
        if not first:
            return  # after a reconnect: go on where the group and cursors were
        seconds, micros = self.client.time()  # Redis's clock: stream ids are its milliseconds
        start = f"{max(0, seconds * 1000 + micros // 1000 - int(self.config.history_s * 1000))}-0"
        self.client.xgroup_setid(self._scores, self.config.group,
                                 start if self.config.history_s > 0 else "$")
        self.client.xgroup_setid(self._events, self.config.group, "0")  # the whole timeline
        self._cursors = {self.streams.key("feedback"): start, self.streams.key("deadletter"): start}
        # lag counts the history as undelivered (at most the stream's length) until caught up
        added = int(self.client.hget(self.streams.counters, "scores:added") or 0)
        behind = self.client.xlen(self._scores) if self.config.history_s > 0 else 0
        self.client.hset(self.streams.counters, self._delivered_key, max(0, added - behind))
        self._poll(force=True)

    @property
    def _delivered_key(self) -> str:
        return f"scores:delivered:{self.config.group}"

    def step(self) -> int:
        """One read of every stream; returns the number of score messages taken in."""
        response = self.client.xreadgroup(self.config.group, "dashboard",
                                          {self._scores: ">", self._events: ">"},
                                          count=self.config.batch, block=self.config.block_ms,
                                          noack=True)
        scores, events = [], []
        for stream, entries in response or []:
            (scores if as_text(stream) == self._scores else events).extend(entries)
        if scores:
            self.client.hincrby(self.streams.counters, self._delivered_key, len(scores))
        side = self.client.xread(self._cursors, count=self.config.batch)
        self._ingest(scores, events, side)
        self._caught_up = len(scores) < self.config.batch
        if self._caught_up:
            with self._lock:
                self.metrics.tick()
        self._poll()
        return len(scores)

    def _ingest(self, scores: list, events: list, side: list) -> None:
        """Decode outside the lock, then fold everything in under it."""
        messages = [m for m in (self._decode(f, "score") for _, f in scores) if m is not None]
        records = [r for r in (_unpack(f) for _, f in events) if r is not None]
        feedback, deadletters = [], []
        for stream, entries in side:
            if not entries:
                continue
            key = as_text(stream)
            self._cursors[key] = as_text(entries[-1][0])
            if key == self.streams.key("feedback"):
                feedback.extend(m for m in (self._decode(f, "feedback") for _, f in entries) if m)
            else:
                deadletters.extend((as_text(i), r) for i, r in ((i, _unpack(f)) for i, f in entries)
                                   if r is not None)
        with self._lock:
            for message in messages:
                self.metrics.update(message)
                if message.body["anomalous"] and message.body["heatmap"] is not None:
                    self.gallery.add(message)
            for record in records:
                self._event(record)
            for message in feedback:
                try:
                    verdict_of(message)
                except MessageError:
                    self.skipped += 1
                    continue
                self.metrics.feedback(message)
            for entry, record in deadletters:
                self.metrics.deadletter(record)
                self._recent_deadletters.append({
                    "entry": entry, "at": record.get("at"), "stage": record.get("stage"),
                    "reason": plain(str(record.get("reason", "")), max_text=MAX_TEXT)})

    def _decode(self, fields: dict, kind: str) -> Message | None:
        try:
            return decode_entry(fields, kind)
        except MessageError as error:
            self.skipped += 1
            log.debug("dashboard: skipped an entry: %s", error)
            return None

    def _event(self, record: dict) -> None:
        self._recent_events.append(plain(record, MAX_ITEMS, MAX_TEXT))
        if record.get("event") == "model_current" and isinstance(record.get("version"), int):
            times = self._became_current.setdefault(record["version"], deque(maxlen=10))
            times.append(record.get("at"))
            self._versions_polled = 0.0  # read the registry again now

    # --- once a second: lag, workers, model -----------------------------------------------------

    def _poll(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._polled < self.config.poll_s:
            return
        self._polled = now
        if self._caught_up:
            self.streams.reconcile(self.client, "scores", self.config.group)
        lags = self._read_lags()
        workers = self._read_workers()
        current = self.registry.current()
        versions = None
        if now - self._versions_polled >= self.config.versions_s:
            self._versions_polled = now
            versions = [plain(v, MAX_ITEMS, MAX_TEXT) for v in self.registry.versions()[-100:]]
        with self._lock:
            self._lags, self._workers, self._current = lags, workers, current
            if versions is not None:
                self._versions = versions
            self.metrics.lag = sum(info["lag"] + info["pending"] for group, info in lags.items()
                                   if PIPELINE_GROUPS.get(info["hop"]) == group)
        beat(self.client, self.streams, self.worker, "dashboard", self.started, state="running",
             processed=self.metrics.frames, deadlettered=0, model=current, url=self.address)

    def _read_lags(self) -> dict[str, dict]:
        """Per consumer group of each hop: entries not yet delivered, and delivered but pending."""
        out = {}
        for hop in LAG_HOPS:
            try:
                groups = self.client.xinfo_groups(self.streams.key(hop))
            except redis.ResponseError:  # no such stream yet
                continue
            for group in groups:
                name = as_text(group["name"])
                out[name] = {"hop": hop, "lag": self.streams.lag(self.client, hop, name),
                             "pending": int(group["pending"])}
        return out

    def _read_workers(self) -> list[dict]:
        now = time.time()
        return [record | {"worker": name, "age_s": round(now - record.get("seen", 0), 1),
                          "healthy": now - record.get("seen", 0) < STALE_AFTER_S}
                for name, record in sorted(heartbeats(self.client, self.streams).items())]

    # --- answers for the server -----------------------------------------------------------------

    def summary(self) -> dict:
        """Everything the page's tiles, tables and Prometheus show (plain data)."""
        with self._lock:
            snapshot = self.metrics.snapshot()
            return snapshot | {
                "now": time.time(), "current_model": self._current, "lags": dict(self._lags),
                "workers": list(self._workers), "versions": self._timeline(snapshot),
                "events": list(self._recent_events),
                "recent_deadletters": list(self._recent_deadletters),
                "gallery_size": self.gallery.size, "skipped": self.skipped}

    def _timeline(self, snapshot: dict) -> list[dict]:
        """Model versions, oldest first: the registry's record (provenance, validation...), when
        each became current, how many frames it scored here."""
        return [{k: v for k, v in record.items() if k != "path"} | {
            "current": record.get("version") == self._current,
            "became_current": list(self._became_current.get(record.get("version"), ())),
            "frames_scored": snapshot["by_version"].get(record.get("version"), 0)}
            for record in self._versions]

    def series(self, since: int) -> tuple[int, list[dict]]:
        """(latest point's sequence number, chart points after `since`)."""
        with self._lock:
            points = self.metrics.series_since(since)
            latest = self.metrics.series[-1]["seq"] if self.metrics.series else since
        return latest, points

    def gallery_since(self, since: int) -> dict:
        """Gallery items added after `since` (newest first), and the ids of all items kept."""
        latest, items, ids = self.gallery.since(since)
        with self._lock:
            verdicts = {item.message.frame_id: self.metrics.verdicts.get(item.message.frame_id)
                        for item in items}
            confirmed = {i: self.metrics.verdicts[i] for i in ids if i in self.metrics.verdicts}
        return {"seq": latest, "items": [item.record(verdicts[item.message.frame_id])
                                         for item in items],
                "ids": ids, "verdicts": confirmed}

    def picture(self, frame_id: str) -> bytes | None:
        """JPEG of a gallery frame beside its heat-map overlay; None when it is not in the gallery."""
        return self.pictures.get(frame_id)

    def knows(self, frame_id: str) -> bool:
        """Whether the dashboard has scored this frame recently (only those can be confirmed)."""
        with self._lock:
            return frame_id in self.metrics.known

    def confirm(self, frame_id: str, verdict: str, by: str, note: str) -> str:
        """Write an operator's verdict to the line's feedback stream; returns the entry id."""
        return confirm(self.client, self.streams.line, frame_id, verdict, by, note)


def _unpack(fields: dict) -> dict | None:
    """A msgpack record entry (events, dead letters); None for a foreign entry."""
    try:
        record = msgpack.unpackb(fields[b"m"], raw=False)
    except Exception:
        return None
    return record if isinstance(record, dict) else None
