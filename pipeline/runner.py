"""The stage runner: read a batch from a consumer group, process it, write, acknowledge.

Delivery is at least once. Outputs and acknowledgements go in one MULTI/EXEC transaction, so a
worker that dies never leaves an entry both forwarded and pending; its pending entries are claimed
by a peer (XPENDING + XCLAIM, `pipeline.pending`) once idle for `claim_idle_ms`. A message that
cannot be used (bad msgpack, schema, image...) goes to the dead-letter stream with the reason at
once; one that fails for another reason is retried until `max_deliveries`, then dead-lettered.
Stages that declare idempotent outputs write each frame id once (a marker key set in the same Lua
call). SIGTERM/SIGINT finish the batch in flight, acknowledge it and exit; heartbeats let `glad
status` show every worker's health.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Protocol

import redis

from glad.errors import GladError
from pipeline.errors import MessageError
from pipeline.pending import PendingEntries, entries_of
from pipeline.schema import FIELD, Message, decode_entry
from pipeline.service import Service
from pipeline.streams import (
    DEFAULT_MAXLEN,
    PIPELINE_GROUPS,
    Streams,
    beat,
    deadletter,
    ensure_group,
    heartbeats,
    trim_finished,
)

log = logging.getLogger(__name__)

# KEYS: output stream, done marker; ARGV: packed message, maxlen, marker ttl (s)
WRITE_ONCE = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'm', ARGV[1])
redis.call('SET', KEYS[2], id, 'EX', ARGV[3])
return 1
"""


UNTRIMMED = 2**62  # MAXLEN for writes that `trim_finished` trims afterwards
FORGET_AFTER_S = 3600.0  # a worker silent this long is dropped from the heartbeat table


class Stage(Protocol):
    """One job of the pipeline, run by `StageRunner` (see stages/)."""

    name: str  # also the consumer group name
    input: str  # hop it reads (frames, aligned, features, scores...)
    output: str | None  # hop it writes, or None for a sink
    idempotent: bool  # write each frame id at most once

    def ready(self) -> bool:
        """False while it cannot work yet (e.g. no model published); called between batches,
        where it may also pick up a new model version."""
        ...

    def process(self, messages: list[Message]) -> list[Message | None]:
        """One output per input, in order (None: nothing to write). Raise `GladError` for a
        message that can never be processed, anything else for a transient failure."""
        ...


@dataclass
class RunnerConfig:
    """How a worker reads, retries and reports."""

    batch_size: int = 8
    block_ms: int = 500
    claim_idle_ms: int = 30_000
    claim_every_s: float = 5.0
    max_deliveries: int = 3
    max_backlog: int = 16  # stop reading while the output's group has more than this in flight
    done_ttl_s: int = 3600  # idempotence markers outlive any redelivery (claims, retries)
    heartbeat_s: float = 2.0
    maxlen: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_MAXLEN))


@dataclass
class WorkerStats:
    processed: int = 0
    written: int = 0
    deadlettered: int = 0
    retried: int = 0
    claimed: int = 0


class StageRunner(Service):
    """Runs one `Stage` as one consumer of its group until stopped."""

    def __init__(self, stage: Stage, client: redis.Redis, streams: Streams, url: str,
                 config: RunnerConfig | None = None, consumer: str | None = None):
        super().__init__(client, url)
        self.name = stage.name
        self.stage = stage
        self.streams = streams
        self.config = config or RunnerConfig()
        self.consumer = consumer or f"{stage.name}-{socket.gethostname()}-{os.getpid()}-" \
                                    f"{uuid.uuid4().hex[:4]}"
        self.stats = WorkerStats()
        self.started_at = time.time()
        self._input = streams.key(stage.input)
        self._write_once = client.register_script(WRITE_ONCE)
        self.pending = PendingEntries(client, self._input, stage.name, self.consumer,
                                      self.config.max_deliveries)
        self._last_claim = 0.0
        self._last_heartbeat = 0.0
        self._waiting_logged = False
        self._backlog_since: float | None = None
        self._last_reconcile = 0.0

    # --- lifecycle ------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the worker after the batch in flight."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop_event.set())

    def run(self, max_idle_s: float | None = None) -> WorkerStats:
        """Work until stopped (or, with `max_idle_s`, until nothing came for that long)."""
        log.info("%s: consumer %s on %s", self.stage.name, self.consumer, self._input)
        super().run(max_idle_s)
        return self.stats

    def bootstrap(self) -> None:
        ensure_group(self.client, self._input, self.stage.name)
        # in a transaction the script runs by its digest: load it (a cluster's pipelines do not,
        # and a Redis restarted without persistence forgot it)
        self.client.script_load(WRITE_ONCE)
        self.pending.restart()
        prune_heartbeats(self.client, self.streams)
        self._heartbeat(force=True)

    def on_error_reply(self, error: redis.ResponseError, delay: float) -> None:
        """A group lost with Redis's data is recreated at once; anything else waits `delay`."""
        if "NOGROUP" not in str(error):
            super().on_error_reply(error, delay)
            return
        log.warning("%s: consumer group missing (Redis lost its data?): recreating",
                    self.stage.name)
        with contextlib.suppress(redis.RedisError):
            self.bootstrap()

    def teardown(self) -> None:
        self.client.hdel(self.streams.workers, self.consumer)
        log.info("%s: stopped after %d messages (%d dead-lettered)", self.stage.name,
                 self.stats.processed, self.stats.deadlettered)

    # --- one batch ------------------------------------------------------------------------------

    def step(self) -> int:
        """Read, process, write and acknowledge one batch; returns the number of entries handled."""
        self._heartbeat()
        if not self.stage.ready():
            if not self._waiting_logged:
                log.warning("%s: not ready (waiting for a model?); not reading", self.stage.name)
                self._waiting_logged = True
            self.stop_event.wait(0.2)
            return 0
        self._waiting_logged = False
        if self._backlogged():
            self.stop_event.wait(0.02)
            return 0
        entries, deliveries = self._read()
        if not entries:
            return 0
        self._handle(entries, deliveries)
        return len(entries)

    def _backlogged(self) -> bool:
        group = PIPELINE_GROUPS.get(self.stage.output or "")
        if group is None:
            return False
        backlog = self.streams.in_flight(self.client, self.stage.output, group)
        if backlog <= self.config.max_backlog:
            self._backlog_since = None
            return False
        if self._backlog_since is None:
            self._backlog_since = time.monotonic()
        if time.monotonic() - self._last_reconcile > 1.0:  # counters may have drifted up
            self._last_reconcile = time.monotonic()
            self.streams.reconcile(self.client, self.stage.output, group)
        return True

    def _read(self) -> tuple[list[tuple[str, dict]], dict[str, int]]:
        """Own pending entries first (after a start or reconnect), then claims, then new ones."""
        entries, deliveries = self.pending.own(self.config.batch_size)
        if entries:
            return entries, deliveries
        if time.monotonic() - self._last_claim > self.config.claim_every_s:
            self._last_claim = time.monotonic()
            entries, deliveries = self.pending.claim(self.config.claim_idle_ms,
                                                     self.config.batch_size)
            if entries:
                self.stats.claimed += len(entries)
                return entries, deliveries
        response = self.client.xreadgroup(self.stage.name, self.consumer, {self._input: ">"},
                                          count=self.config.batch_size, block=self.config.block_ms)
        entries = entries_of(response)
        if entries:
            self.client.hincrby(self.streams.counters,
                                f"{self.stage.input}:delivered:{self.stage.name}", len(entries))
        return entries, {}

    def _handle(self, entries: list[tuple[str, dict]], deliveries: dict[str, int]) -> None:
        raw = dict(entries)
        messages, ids, dead = [], [], []
        for entry_id, fields in entries:
            if not fields:
                dead.append((entry_id, {}, "entry trimmed (MAXLEN) before it was processed; its "
                             "payload is gone", "Trimmed"))
                continue
            try:
                message = decode_entry(fields)
                entries_seen = message.meta.get("entries")
                message.meta["entries"] = {**(entries_seen if isinstance(entries_seen, dict)
                                              else {}), self.stage.input: entry_id}
                messages.append(message)
                ids.append(entry_id)
            except MessageError as error:
                dead.append((entry_id, fields, str(error), "MessageError"))
        outputs, failures = self._process(messages)
        ack = [entry_id for entry_id, _, _, _ in dead]
        writes = []
        for index, entry_id in enumerate(ids):
            if index in failures:
                error = failures[index]
                fields = raw[entry_id]
                attempts = deliveries.get(entry_id, 1)
                if isinstance(error, GladError) or attempts >= self.config.max_deliveries:
                    dead.append((entry_id, fields, _reason(error, attempts), type(error).__name__))
                    ack.append(entry_id)
                else:  # left pending: claimed again after claim_idle_ms
                    self.stats.retried += 1
                    log.warning("%s: frame %s failed (attempt %d of %d), will retry: %s",
                                self.stage.name, messages[index].frame_id, attempts,
                                self.config.max_deliveries, _reason(error, attempts))
                continue
            ack.append(entry_id)
            if outputs[index] is not None:
                writes.append(outputs[index])
        self._commit(writes, ack, dead)
        self.stats.processed += len(messages) - len(failures)

    def _process(self, messages: list[Message]) -> tuple[list, dict[int, Exception]]:
        """Outputs of the batch; when the batch fails, each message alone isolates the bad ones."""
        if not messages:
            return [], {}
        try:
            outputs = self.stage.process(messages)
            return outputs, {}
        except Exception as error:
            if len(messages) == 1:
                return [None], {0: error}
            log.debug("%s: batch failed (%s); processing one by one", self.stage.name, error)
        outputs, failures = [], {}
        for index, message in enumerate(messages):
            try:
                outputs.extend(self.stage.process([message]))
            except Exception as error:
                outputs.append(None)
                failures[index] = error
        return outputs, failures

    def _commit(self, writes: list[Message], ack: list[str], dead: list[tuple]) -> None:
        """Outputs, dead letters and acknowledgements in one transaction."""
        pipe = self.client.pipeline(transaction=True)
        now = time.time()
        maxlen = self.config.maxlen.get(self.stage.output, 10_000)
        trim_later = self.stage.output in PIPELINE_GROUPS  # never below what its stage holds
        if writes:
            out = self.streams.key(self.stage.output)
            cap = UNTRIMMED if trim_later else maxlen
            for message in writes:
                message.stamps[self.stage.name] = now
                if self.stage.idempotent:
                    self._write_once(keys=[out, self.streams.done(self.stage.name, message.frame_id)],
                                     args=[message.encode(), cap, self.config.done_ttl_s],
                                     client=pipe)
                else:
                    pipe.xadd(out, {FIELD: message.encode()}, maxlen=cap, approximate=True)
            pipe.hincrby(self.streams.counters, f"{self.stage.output}:added", len(writes))
        for entry_id, fields, reason, error_type in dead:
            deadletter(pipe, self.streams, self.stage.name, self._input, entry_id, reason,
                       error_type, fields.get(FIELD, b""),
                       self.config.maxlen.get("deadletter", DEFAULT_MAXLEN["deadletter"]))
        if ack:
            pipe.xack(self._input, self.stage.name, *ack)
        if writes and trim_later:
            pipe.xlen(self.streams.key(self.stage.output))
        replies = pipe.execute()
        if writes and trim_later:
            trim_finished(self.client, self.streams, self.stage.output, replies[-1], maxlen)
        self.stats.written += len(writes)
        self.stats.deadlettered += len(dead)

    # --- health ---------------------------------------------------------------------------------

    def _heartbeat(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_heartbeat < self.config.heartbeat_s:
            return
        self._last_heartbeat = now
        state = "waiting" if self._waiting_logged else (
            "backpressure" if self._backlog_since is not None else "running")
        beat(self.client, self.streams, self.consumer, self.stage.name, self.started_at,
             state=state, processed=self.stats.processed, deadlettered=self.stats.deadlettered,
             claimed=self.stats.claimed, reconnects=self.reconnects,
             model=getattr(self.stage, "model_version", None))


def prune_heartbeats(client: redis.Redis, streams: Streams, older_than_s: float = FORGET_AFTER_S,
                     ) -> None:
    """Forget workers whose last heartbeat is older than `older_than_s` (gone for good)."""
    now = time.time()
    for name, record in heartbeats(client, streams).items():
        if now - record.get("seen", 0) > older_than_s:
            client.hdel(streams.workers, name)


def _reason(error: Exception, attempts: int) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    if isinstance(error, GladError):
        return text or type(error).__name__
    where = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    place = f" at {os.path.basename(where.filename)}:{where.lineno}" if where else ""
    return f"{type(error).__name__}: {text}{place} (after {attempts} deliveries)"
