"""Stream names per production line, consumer groups, lag counters and the events stream.

Every key of a line starts with `glad:{LINE}:` (braces included: a Redis Cluster hash tag), so
many lines share one Redis, or spread over a cluster. Redis 6.2 (the
bundled server) has no per-group lag, so writers count what they add to each stream and readers
count what their group was delivered, in one hash; lag = added - delivered. The counts also give
backpressure: a stage stops reading while its output's consumers lag too far behind, and the
pipeline hops are trimmed only below their stage's oldest unfinished entry (`trim_finished`), so
trimming never drops an entry nobody has finished.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import msgpack
import redis

from pipeline.errors import Backpressure, PipelineError

log = logging.getLogger(__name__)

LINE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# hop -> the consumer group of the pipeline stage that reads it
PIPELINE_GROUPS = {"frames": "align", "aligned": "extract", "features": "score"}
# Entries kept per stream (MAXLEN ~): raw frames/features are large, scores and records small.
DEFAULT_MAXLEN = {"frames": 2000, "aligned": 256, "features": 256, "scores": 100_000,
                  "feedback": 100_000, "deadletter": 10_000, "events": 10_000}
STALE_AFTER_S = 10.0  # a heartbeat older than this marks the worker stale
BACKLOG_POLL_S = 0.01  # how often a producer waiting for room looks again


def check_line(line: str) -> str:
    if not LINE_PATTERN.match(line):
        raise PipelineError(f"bad line name {line!r}: use letters, digits, '_', '.', '-' "
                            "(at most 64)")
    return line


@dataclass(frozen=True)
class Streams:
    """Every Redis key of one production line (streams, counters, heartbeats, the registry's,
    the updater's lease): built here only, all under `prefix`."""

    line: str

    def __post_init__(self) -> None:
        check_line(self.line)

    @property
    def prefix(self) -> str:
        """`glad:{LINE}:`, the start of every key of the line. The braces are a Redis Cluster
        hash tag: all of a line's keys live in one slot, so its transactions, scripts and
        multi-stream reads work on a cluster, and lines spread over the nodes."""
        return f"glad:{{{self.line}}}:"

    def key(self, hop: str) -> str:
        """The stream of a hop: frames, aligned, features, scores, feedback, deadletter, events."""
        return f"{self.prefix}{hop}"

    @property
    def workers(self) -> str:
        """Hash: worker name -> msgpack heartbeat."""
        return f"{self.prefix}workers"

    @property
    def counters(self) -> str:
        """Hash: "{hop}:added" and "{hop}:delivered:{group}" counts."""
        return f"{self.prefix}counters"

    def model(self, name: str) -> str:
        """Registry keys: "current" (the pointer), "versions" (records), "history", "next"."""
        return f"{self.prefix}model:{name}"

    @property
    def epoch(self) -> str:
        """A token that changes when Redis loses the line's data (see `glad run`'s counts)."""
        return f"{self.prefix}epoch"

    @property
    def updater_lease(self) -> str:
        """The online updater's leader lease."""
        return f"{self.prefix}updater:lease"

    def done(self, stage: str, frame_id: str) -> str:
        """Marker that `stage` already wrote its output for `frame_id` (idempotent outputs)."""
        return f"{self.prefix}done:{stage}:{frame_id}"

    def lag(self, client: redis.Redis, hop: str, group: str) -> int:
        """Entries of `hop` not yet delivered to `group`."""
        added, delivered = client.hmget(self.counters, f"{hop}:added", f"{hop}:delivered:{group}")
        return max(0, int(added or 0) - int(delivered or 0))

    def reconcile(self, client: redis.Redis, hop: str, group: str) -> None:
        """Correct the counters when `group` has in fact read the whole stream (counts drift up
        when undelivered entries are trimmed or a reader dies between its read and its count)."""
        try:
            groups = {as_text(g["name"]): g for g in client.xinfo_groups(self.key(hop))}
        except redis.ResponseError:  # no such stream
            return
        last = client.xrevrange(self.key(hop), count=1)
        if group in groups and (not last or _id(as_text(groups[group]["last-delivered-id"]))
                                >= _id(as_text(last[0][0]))):
            added = client.hget(self.counters, f"{hop}:added") or 0
            client.hset(self.counters, f"{hop}:delivered:{group}", int(added))

    def in_flight(self, client: redis.Redis, hop: str, group: str) -> int:
        """Entries of `hop` that `group` has not finished: undelivered plus pending (delivered,
        not acknowledged, e.g. held by a worker that died and awaits a claim)."""
        try:
            pending = int(client.xpending(self.key(hop), group)["pending"])
        except redis.ResponseError:  # no stream or group yet
            pending = 0
        return self.lag(client, hop, group) + pending


def trim_finished(client: redis.Redis, streams: Streams, hop: str, length: int,
                  maxlen: int) -> None:
    """Keep a pipeline hop (frames, aligned, features) near `maxlen` entries without ever
    trimming one its stage has not finished: when it is longer, the entries older than the
    oldest unfinished one go (approximately, whole nodes). MAXLEN alone trimmed entries still
    pending for a worker that died, when the claims took longer than `maxlen` newer entries
    (bench_soak found 7 of 1,500 frames lost that way). `length` is the hop's length, which
    writers read in the transaction of their append (no extra round trip)."""
    key = streams.key(hop)
    if length > maxlen:
        client.xtrim(key, minid=_unfinished_floor(client, key, PIPELINE_GROUPS[hop]),
                     approximate=True)


def _unfinished_floor(client: redis.Redis, key: str, group: str) -> str:
    """The id of the oldest entry `group` has not finished: its oldest pending entry, else the
    one after the last it was given ("0-1", which trims nothing, before the group exists)."""
    try:
        groups = {as_text(g["name"]): g for g in client.xinfo_groups(key)}
    except redis.ResponseError:  # no such stream
        return "0-1"
    if group not in groups:
        return "0-1"
    pending = client.xpending(key, group)
    if pending["pending"]:
        return as_text(pending["min"])
    milliseconds, sequence = _id(as_text(groups[group]["last-delivered-id"]))
    return f"{milliseconds}-{sequence + 1}"


def wait_for_room(client: redis.Redis, streams: Streams, hop: str, max_backlog: int,
                  stop: threading.Event | None = None, timeout: float | None = None) -> bool:
    """Wait until the stage reading `hop` has at most `max_backlog` entries in flight (so an
    append can never push an unfinished entry past MAXLEN). False when `stop` was set first;
    raises Backpressure after `timeout` seconds (None: wait as long as it takes)."""
    group = PIPELINE_GROUPS[hop]
    stop = stop or threading.Event()  # never set: a plain wait
    deadline = None if timeout is None else time.monotonic() + timeout
    last_reconcile = time.monotonic()
    while streams.in_flight(client, hop, group) > max_backlog:
        if stop.is_set():
            return False
        if deadline is not None and time.monotonic() >= deadline:
            raise Backpressure(f"line {streams.line}: the {group} stage has had more than "
                               f"{max_backlog} {hop} in flight for {timeout:g} s; the frame was "
                               "not sent (start or scale the workers, or send slower)")
        if time.monotonic() - last_reconcile > 1.0:  # counters may have drifted up
            streams.reconcile(client, hop, group)
            last_reconcile = time.monotonic()
        stop.wait(BACKLOG_POLL_S)
    return True


def beat(client: redis.Redis, streams: Streams, worker: str, stage: str, started: float,
         **fields: Any) -> None:
    """Write a worker's heartbeat (what `glad status` shows): who and where it is, when it was
    last seen, plus the stage's own `fields` (state, processed, model...)."""
    record = {"stage": stage, "host": socket.gethostname(), "pid": os.getpid(),
              "started": started, "seen": time.time(), **fields}
    client.hset(streams.workers, worker, msgpack.packb(record))


def heartbeats(client: redis.Redis, streams: Streams) -> dict[str, dict]:
    """Every worker's last heartbeat, by worker name; an unreadable entry reads as never seen."""
    out = {}
    for name, packed in client.hgetall(streams.workers).items():
        try:
            record = msgpack.unpackb(packed, raw=False)
        except Exception:  # a foreign value in the hash
            record = {}
        out[as_text(name)] = record if isinstance(record, dict) else {}
    return out


def as_text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _id(entry_id: str) -> tuple[int, int]:
    milliseconds, _, sequence = entry_id.partition("-")
    return int(milliseconds), int(sequence or 0)


def ensure_group(client: redis.Redis, stream: str, group: str) -> None:
    """Create the consumer group (and the stream) if missing; it starts at the stream's start."""
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as error:
        if "BUSYGROUP" not in str(error):
            raise


def publish_event(client: redis.Redis, streams: Streams, event: str, **fields: Any) -> bytes:
    """Append {"v": 1, "event": event, "at": unix time, **fields} to the line's events stream."""
    record = {"v": 1, "event": event, "at": time.time(), **fields}
    return client.xadd(streams.key("events"), {b"m": msgpack.packb(record, use_bin_type=True)},
                       maxlen=DEFAULT_MAXLEN["events"], approximate=True)


def read_events(client: redis.Redis, streams: Streams, after: str = "0",
                count: int = 1000) -> list[tuple[str, dict]]:
    """Events after entry id `after`, oldest first, as (entry id, record)."""
    entries = client.xrange(streams.key("events"), min=f"({after}" if after != "0" else "-",
                            count=count)
    out = []
    for entry_id, fields in entries:
        try:
            out.append((entry_id.decode(), msgpack.unpackb(fields[b"m"], raw=False)))
        except Exception:  # a foreign entry on the events stream is skipped, not fatal
            continue
    return out


def deadletter(client: redis.Redis, streams: Streams, stage: str, stream: str, entry: str,
               reason: str, error: str, payload: bytes,
               maxlen: int = DEFAULT_MAXLEN["deadletter"]) -> None:
    """Park an entry a stage cannot use on the line's dead-letter stream, with the reason and
    its original bytes (nothing is lost); `client` may be a pipeline."""
    record = {"v": 1, "stage": stage, "stream": stream, "entry": entry, "reason": reason,
              "error": error, "at": time.time(), "payload": payload}
    client.xadd(streams.key("deadletter"), {b"m": msgpack.packb(record, use_bin_type=True)},
                maxlen=maxlen, approximate=True)
    log.warning("%s: entry %s dead-lettered: %s", stage, entry, reason)
