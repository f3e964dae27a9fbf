"""The online updater service (`glad updater`): learns from operators' confirmations and publishes
versions that passed the validation gate.

Loop: hold the line's lease (one updater publishes; a standby takes over when the lease lapses)
-> read confirmations from the feedback stream (consumer group "updater") -> find each frame's
features (features stream; else re-extract from its aligned image; else align its raw frame)
-> confirmed normals: every `holdback_every`-th is held back for validation, the others are
learned (online K-MLE); confirmed defects become canaries -> gate the candidate -> publish it, or
keep it under `candidates/` with the reasons -> commit the state -> acknowledge.

Only confirmed normals ever train. The state (the working model with its statistics, the last
applied feedback entry, the frames applied, the held-back frames and canaries) is committed to
`{models}/{line}/updater/` atomically before entries are acknowledged, so a restart resumes from
it and never applies a confirmation twice.
"""

from __future__ import annotations

import logging
import os
import time
import uuid

import redis

from glad.errors import GladError, ModelFileError
from glad.online_kmle import OnlineGlad
from online.config import UpdaterConfig
from online.examples import FeedbackError, RecentFrames, canary_of
from online.gate import Gate
from online.learner import Learner
from online.lease import Lease
from online.state import StateStore, UpdaterState
from pipeline.errors import MessageError
from pipeline.feedback import verdict_of
from pipeline.registry import ModelRegistry
from pipeline.schema import FIELD, Message, decode_entry
from pipeline.service import Service
from pipeline.streams import Streams, as_text, beat, deadletter, ensure_group

log = logging.getLogger(__name__)

GROUP = "updater"
CONSUMER = "leader"  # one name: a new leader re-reads what a dead one left pending
WAIT_FOR_MODEL_S = 30.0  # a line whose model cannot learn online is looked at again this often


class Updater(Service):
    """The online updater of one line: it leads the line, reads confirmations, sorts them into
    examples for its learner (`online.learner`), and acknowledges them once committed."""

    name = "updater"

    def __init__(self, client: redis.Redis, streams: Streams, registry: ModelRegistry,
                 config: UpdaterConfig | None = None, device: str = "cpu",
                 worker: str | None = None, url: str | None = None):
        super().__init__(client, url)
        self.streams, self.registry = streams, registry
        self._once = False
        self.config = config or UpdaterConfig()
        self.worker = worker or f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.store = StateStore(registry.folder / "updater", self.worker)
        self.recent = RecentFrames(client, streams, self.config.index_size)
        self.lease = Lease(client, streams.updater_lease, self.worker, self.config.lease_ms)
        self.learner = Learner(client, streams, registry, self.store, self.lease, self.config,
                               device)
        self._leading = False
        self._pending = True
        self._started, self._last_beat = time.time(), 0.0

    @property
    def state(self) -> UpdaterState | None:
        """The learner's state (None until this updater first leads)."""
        return self.learner.state

    @property
    def gate(self) -> Gate:
        """The learner's held-back frames and canaries."""
        return self.learner.gate

    @property
    def online(self) -> OnlineGlad | None:
        """The learner's working model (None until this updater first leads)."""
        return self.learner.online

    @property
    def timings(self) -> dict[str, float]:
        """Seconds per part (learn, gate, publish, commit) of the last batch."""
        return self.learner.timings

    # --- lifecycle ------------------------------------------------------------------------------

    def run(self, once: bool = False) -> None:
        """Serve until stopped (`once`: until the feedback stream has nothing more to read);
        on the way out, hand the lease over and remove the heartbeat."""
        self._once = once
        super().run(max_idle_s=0.0 if once else None)

    def bootstrap(self) -> None:
        ensure_group(self.client, self.streams.key("feedback"), GROUP)
        self._leading = False  # (again) re-read the committed state and the pending entries

    def teardown(self) -> None:
        self.lease.release()
        self.client.hdel(self.streams.workers, self.worker)

    def step(self) -> int:
        """Lead the line (or wait for the lease), apply one batch of confirmations, beat; a
        model it cannot learn on waits for another version (ends `once`)."""
        if not self._hold_lease():
            if self._once:
                raise FeedbackError(f"another updater ({self.lease.current_holder()}) leads line "
                                    f"{self.streams.line}")
            self.stop_event.wait(self.config.lease_ms / 3000)
            return 0
        try:
            handled = self.apply_batch()
        except ModelFileError as error:  # e.g. a model fitted before online statistics
            if self._once:
                raise
            log.error("line %s: cannot learn: %s; waiting for another version",
                      self.streams.line, error)
            self._leading = False
            self.stop_event.wait(WAIT_FOR_MODEL_S)
            return 0
        self._beat()
        return handled

    def _beat(self) -> None:
        """The heartbeat `glad status` and the dashboard show, at most once a second."""
        now = time.monotonic()
        if now - self._last_beat < 1.0:
            return
        self._last_beat = now
        beat(self.client, self.streams, self.worker, "updater", self._started, state="leading",
             model=self.state.version, processed=self.state.confirmed_normal,
             updates=self.state.updates)

    def _hold_lease(self) -> bool:
        held = self.lease.renew()
        if held and not self._leading:
            log.info("line %s: updater %s leads", self.streams.line, self.worker)
            self._leading = True
            self._start_leading()
        elif not held and self._leading:
            log.warning("line %s: updater %s lost the lease to %s", self.streams.line,
                        self.worker, self.lease.current_holder())
            self._leading = False
        return held

    def _start_leading(self) -> None:
        self.store.remove_leftovers()
        self.registry.collect_garbage()
        self.learner.load()
        self.recent.prime()
        self._pending = True  # first re-read what a previous leader left unacknowledged
        if self.state.dirty:
            self.learner.decide()

    # --- one step -------------------------------------------------------------------------------

    def apply_batch(self) -> int:
        """Read and apply one batch of confirmations; returns how many entries it handled."""
        self.learner.follow_current()
        self.recent.refresh()
        entries = self._read_feedback()
        if not entries:
            return 0
        learn, acked = [], []
        for entry_id, fields in entries:
            acked.append(entry_id)
            if _entry_key(entry_id) <= _entry_key(self.state.last_entry):
                continue  # applied before a restart, not yet acknowledged then
            try:
                message = decode_entry(fields, "feedback")
                verdict = verdict_of(message)
                self._check(message)
                example, image = self.recent.example(message.frame_id, self.online.model(),
                                                     self.state.lineage)
            except (MessageError, FeedbackError, GladError) as error:
                deadletter(self.client, self.streams, "updater", self.streams.key("feedback"),
                           entry_id, str(error), type(error).__name__, fields.get(FIELD, b""))
                continue
            self.learner.remember(message.frame_id)
            if verdict == "anomalous":
                self.gate.canaries.append(example)
                continue
            self.state.confirmed_normal += 1
            if (self.state.confirmed_normal - 1) % self.config.holdback_every == 0:
                self.gate.held_back.append(example)
                canary = canary_of(example, image, self.online.model())
                if canary is not None:
                    self.gate.canaries.append(canary)
            else:
                learn.append(example)
        self.state.last_entry = as_text(entries[-1][0])
        self.learner.apply(learn)
        self.client.xack(self.streams.key("feedback"), GROUP, *acked)
        return len(entries)

    def _check(self, message: Message) -> None:
        if message.line != self.streams.line:
            raise FeedbackError(f"confirmation of frame {message.frame_id!r} names line "
                                f"{message.line!r}, not {self.streams.line!r}")
        if message.frame_id in self.learner.applied:
            raise FeedbackError(f"frame {message.frame_id!r} was confirmed before; a frame "
                                "trains or validates the model once")

    def _read_feedback(self) -> list[tuple[str, dict]]:
        key = self.streams.key("feedback")
        start = "0" if self._pending else ">"
        reply = self.client.xreadgroup(GROUP, CONSUMER, {key: start}, count=self.config.batch,
                                       block=None if self._pending else self.config.block_ms)
        entries = reply[0][1] if reply else []
        if self._pending and not entries:
            self._pending = False
            return self._read_feedback()
        return [(as_text(entry_id), fields) for entry_id, fields in entries]


def _entry_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
