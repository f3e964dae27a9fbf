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

import json
import logging
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis
import torch

from glad.errors import GladError, ModelFileError
from glad.model import GladModel
from glad.online_kmle import OnlineConfig, OnlineGlad, UnsoundUpdateError
from glad.validation import shifted_calibration
from online.examples import FeedbackError, RecentFrames, canary_of
from online.gate import Example, Gate, GateConfig
from online.lease import Lease
from online.state import StateStore, UpdaterState
from pipeline.errors import MessageError
from pipeline.feedback import verdict_of
from pipeline.registry import ModelRegistry
from pipeline.schema import FIELD, Message, decode_entry
from pipeline.service import Service
from pipeline.streams import Streams, as_text, beat, deadletter, ensure_group, publish_event

log = logging.getLogger(__name__)

GROUP = "updater"
CONSUMER = "leader"  # one name: a new leader re-reads what a dead one left pending
WAIT_FOR_MODEL_S = 30.0  # a line whose model cannot learn online is looked at again this often


@dataclass(frozen=True)
class UpdaterConfig:
    online: OnlineConfig = OnlineConfig()
    gate: GateConfig = GateConfig()
    holdback_every: int = 4  # every n-th confirmed normal validates instead of training
    consolidate_every: int = 16  # updates between consolidations (replay re-assignment)
    batch: int = 32  # confirmations read at once
    block_ms: int = 500
    lease_ms: int = 15_000
    index_size: int = 5_000  # frames whose score messages are remembered
    applied_memory: int = 10_000  # frame ids remembered as applied (duplicates; > index_size)


class Updater(Service):
    """The online updater of one line."""

    name = "updater"

    def __init__(self, client: redis.Redis, streams: Streams, registry: ModelRegistry,
                 config: UpdaterConfig | None = None, device: str = "cpu",
                 worker: str | None = None, url: str | None = None):
        super().__init__(client, url)
        self.streams, self.registry = streams, registry
        self._once = False
        self.config = config or UpdaterConfig()
        self.device = device
        self.worker = worker or f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.store = StateStore(registry.folder / "updater", self.worker)
        self.gate = Gate(self.config.gate)
        self.recent = RecentFrames(client, streams, self.config.index_size)
        self.lease = Lease(client, streams.updater_lease, self.worker, self.config.lease_ms)
        self._leading = False
        self._pending = True
        self._applied: set[str] = set()
        self.timings: dict[str, float] = {}  # seconds per part of the last step
        self._started, self._last_beat = time.time(), 0.0
        self.state: UpdaterState | None = None
        self.online: OnlineGlad | None = None
        self.production: GladModel | None = None

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
        self._load_state()
        self.recent.prime()
        self._pending = True  # first re-read what a previous leader left unacknowledged
        if self.state.dirty:
            self._decide()

    # --- one step -------------------------------------------------------------------------------

    def apply_batch(self) -> int:
        """Read and apply one batch of confirmations; returns how many entries it handled."""
        self._follow_current()
        self.recent.refresh()
        entries = self._read_feedback()
        if not entries:
            return 0
        self.timings = {}
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
            self._remember(message.frame_id)
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
        if learn:
            with self._timed("learn"):
                self._learn(learn)
        self._decide()
        self.client.xack(self.streams.key("feedback"), GROUP, *acked)
        return len(entries)

    @contextmanager
    def _timed(self, part: str):
        """Accumulate the seconds of one part of the current step in `timings`."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[part] = self.timings.get(part, 0.0) + time.perf_counter() - started

    def _check(self, message: Message) -> None:
        if message.line != self.streams.line:
            raise FeedbackError(f"confirmation of frame {message.frame_id!r} names line "
                                f"{message.line!r}, not {self.streams.line!r}")
        if message.frame_id in self._applied:
            raise FeedbackError(f"frame {message.frame_id!r} was confirmed before; a frame "
                                "trains or validates the model once")

    def _learn(self, examples: list[Example]) -> None:
        """Learn confirmed normals. A failed update (unsound parameters, or any error in the
        math) leaves the working model as it was; it is parked and announced like a rejected
        candidate, and the service goes on with the next confirmations."""
        started = time.perf_counter()
        layers = [torch.from_numpy(np.stack([e.features[i] for e in examples])).float()
                  for i in range(len(examples[0].features))]
        try:
            report = self.online.learn(layers, np.stack([e.valid for e in examples]))
        except Exception as error:
            log.error("line %s: learning %d frames failed", self.streams.line, len(examples),
                      exc_info=not isinstance(error, UnsoundUpdateError))
            self.state.generation += 1
            self._park(None, {"passed": False, "reasons": [f"learning failed: {error}"],
                              "frames": [e.frame_id for e in examples]})
            return
        self.state.updates += 1
        if self.state.updates % self.config.consolidate_every == 0:
            try:
                log.info("consolidation: %d vectors changed Gaussian", self.online.consolidate())
            except Exception:  # the model stays as learned, unconsolidated
                log.exception("line %s: consolidation failed", self.streams.line)
        self.state.trained += [e.frame_id for e in examples]
        self.state.dirty = True
        self.state.generation += 1
        log.info("learned %d frames in %.2f s: novel vectors %s, new Gaussians %s",
                 len(examples), time.perf_counter() - started, report.novel, report.spawned)

    # --- gate and publish -----------------------------------------------------------------------

    def _decide(self) -> None:
        """Gate the working model when it changed, publish or park it, and commit the state."""
        if self.state.dirty:
            with self._timed("commit"):
                self._commit()  # what was learned is safe before anything is published
            candidate = self.online.model()
            with self._timed("gate"):
                threshold, record = self.gate.evaluate(candidate, self.production,
                                                       self.state.base_components)
            candidate.threshold_ = threshold
            candidate.calibration_ = shifted_calibration(self.production.calibration_, threshold)
            candidate.validation_ = None  # the gate's record (provenance) judges this version
            with self._timed("publish"):
                if record["passed"] and self.lease.renew():  # never publish without the lease
                    self._publish(candidate, record)
                else:
                    self._park(candidate, record)
        with self._timed("commit"):
            self._commit()

    def _publish(self, candidate: GladModel, record: dict) -> None:
        staging = self.store.staging()
        shutil.rmtree(staging, ignore_errors=True)
        candidate.save(staging)
        provenance = {"by": "updater", "frames": self.state.trained[-1000:],
                      "n_frames": len(self.state.trained), "validation": record,
                      "threshold": record["threshold"], "generation": self.state.generation,
                      "steps": self.online.steps_}
        version = self.registry.publish(staging, note=f"online update of v{self.state.version}",
                                        parent=self.state.version, provenance=provenance)
        shutil.rmtree(staging, ignore_errors=True)
        log.info("line %s: published v%d (parent v%d, %d frames, threshold %.3f)",
                 self.streams.line, version, self.state.version, len(self.state.trained),
                 record["threshold"])
        self._adopt(version, candidate)

    def _adopt(self, version: int, model: GladModel) -> None:
        """`version` (this updater's candidate `model`) is production now."""
        self.state.lineage.append(version)
        self.state.version, self.state.trained, self.state.dirty = version, [], False
        self.production = model

    def _park(self, candidate: GladModel | None, record: dict) -> None:
        """Keep a rejected candidate for inspection (None: an update refused before any candidate
        existed; only its record is kept); the working model keeps learning."""
        target = self.registry.folder / "candidates" / f"g{self.state.generation:06d}"
        if candidate is not None:
            candidate.save(target)
        target.mkdir(parents=True, exist_ok=True)
        (target / "validation.json").write_text(json.dumps(record, indent=2, default=float))
        publish_event(self.client, self.streams, "candidate_rejected",
                      generation=self.state.generation, reasons="; ".join(record["reasons"]),
                      path=str(target))
        log.warning("line %s: candidate g%d not published: %s", self.streams.line,
                    self.state.generation, "; ".join(record["reasons"]))
        self.state.dirty = False

    # --- state ----------------------------------------------------------------------------------

    def _load_state(self) -> None:
        current = self.registry.current() or self.registry.restore()
        if current is None:
            raise FeedbackError(f"line {self.streams.line} has no model yet; publish one first")
        committed = self.store.latest()
        if committed is not None:
            folder, state = committed
            if state.version == current or self._published_by(state, current):
                self._restore(folder, state)
                if state.version != current:  # published just before a crash: adopt it
                    self._adopt(current, GladModel.load(self.registry.path(current),
                                                        backbone=self.production.backbone_))
                log.info("resumed from %s (v%d, feedback after %s)", folder.name, state.version,
                         state.last_entry)
                return
            log.warning("line %s: current model v%d is not the updater's lineage (v%d): "
                        "starting over from v%d", self.streams.line, current, state.version,
                        current)
            self.state = state  # keeps the feedback position and the frames applied
        self._start_from(current)

    def _published_by(self, state: UpdaterState, version: int) -> bool:
        """Whether `version` is the candidate `state` was about to publish when it stopped."""
        record = self.registry.record(version)
        provenance = record.get("provenance") or {}
        return (state.dirty and provenance.get("by") == "updater"
                and record.get("parent") == state.version
                and provenance.get("generation") == state.generation)

    def _start_from(self, version: int) -> None:
        """A fresh working model from registry `version`; feedback position and the frames
        applied so far carry over (a confirmation is never applied twice)."""
        model = GladModel.load(self.registry.path(version), device=self.device)
        previous = self.state
        self.state = UpdaterState(version=version, lineage=[version],
                                  base_components=[lay.mixture.n_components for lay in model.layers_])
        if previous is not None:
            self.state.last_entry, self.state.applied = previous.last_entry, previous.applied
        self._applied = set(self.state.applied)
        self.online = OnlineGlad(model, self.config.online)
        self.production = model
        self.gate = Gate(self.config.gate)

    def _restore(self, folder: Path, state: UpdaterState) -> None:
        working = GladModel.load(folder / "model", device=self.device)
        self.state = state
        self.online = OnlineGlad(working, self.config.online)
        self.production = GladModel.load(self.registry.path(state.version),
                                         backbone=working.backbone_)
        self._applied = set(state.applied)
        self.gate = Gate(self.config.gate)
        self.store.restore_gate(folder, self.gate)

    def _commit(self) -> None:
        self.state.applied = self.state.applied[-self.config.applied_memory:]
        self.store.commit(self.state, self.online.model(), self.gate)

    def _follow_current(self) -> None:
        """Start over when someone else moved the line to a version outside our lineage (a new
        fit published, a rollback): its reference image and statistics are what count now."""
        current = self.registry.current()
        if current is not None and current != self.state.version:
            log.warning("line %s: current model moved to v%d outside the updater (v%d): "
                        "starting over from it", self.streams.line, current, self.state.version)
            self._start_from(current)

    # --- feedback and frames --------------------------------------------------------------------

    def _read_feedback(self) -> list[tuple[bytes, dict]]:
        key = self.streams.key("feedback")
        start = "0" if self._pending else ">"
        reply = self.client.xreadgroup(GROUP, CONSUMER, {key: start}, count=self.config.batch,
                                       block=None if self._pending else self.config.block_ms)
        entries = reply[0][1] if reply else []
        if self._pending and not entries:
            self._pending = False
            return self._read_feedback()
        return [(as_text(entry_id), fields) for entry_id, fields in entries]

    def _remember(self, frame_id: str) -> None:
        self._applied.add(frame_id)
        self.state.applied.append(frame_id)


def _entry_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
