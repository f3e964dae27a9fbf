"""The online updater's learner: the working model of one line and what becomes of it.

It resumes from the committed state (or starts over from the registry's current version),
learns a batch's confirmed normals (online K-MLE), gates the candidate against production,
publishes it or keeps it under `candidates/` with the reasons, and commits the state. The
updater service (`online.updater`) reads the confirmations, sorts them into examples, hands each
batch over and acknowledges it once it is committed here.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import redis
import torch

from glad.model import GladModel
from glad.online_kmle import OnlineGlad, UnsoundUpdateError
from glad.validation import shifted_calibration
from online.config import UpdaterConfig
from online.examples import FeedbackError
from online.gate import Example, Gate
from online.lease import Lease
from online.state import StateStore, UpdaterState
from pipeline.registry import ModelRegistry
from pipeline.streams import Streams, publish_event

log = logging.getLogger(__name__)


class Learner:
    """The working model of one line (online K-MLE over the version it descends from), the
    production model it is gated against, the gate's examples and the state committed with them.
    Nothing is loaded before `load` (when the updater starts leading)."""

    def __init__(self, client: redis.Redis, streams: Streams, registry: ModelRegistry,
                 store: StateStore, lease: Lease, config: UpdaterConfig, device: str = "cpu"):
        self.client, self.streams, self.registry = client, streams, registry
        self.store, self.lease, self.config, self.device = store, lease, config, device
        self.gate = Gate(config.gate)
        self.applied: set[str] = set()  # the state's frames applied, to refuse duplicates
        self.timings: dict[str, float] = {}  # seconds per part of the last batch
        self.state: UpdaterState | None = None
        self.online: OnlineGlad | None = None
        self.production: GladModel | None = None

    # --- one batch ------------------------------------------------------------------------------

    def remember(self, frame_id: str) -> None:
        """`frame_id`'s confirmation is applied: it never trains or validates again."""
        self.applied.add(frame_id)
        self.state.applied.append(frame_id)

    def apply(self, learn: list[Example]) -> None:
        """Learn a batch's confirmed normals (if any), then gate, publish or park and commit."""
        self.timings = {}
        if learn:
            with self._timed("learn"):
                self._learn(learn)
        self.decide()

    @contextmanager
    def _timed(self, part: str) -> Iterator[None]:
        """Accumulate the seconds of one part of the current batch in `timings`."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[part] = self.timings.get(part, 0.0) + time.perf_counter() - started

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

    def decide(self) -> None:
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

    def load(self) -> None:
        """Resume from the committed state when it descends from the current version, else
        start over from the current version."""
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

    def follow_current(self) -> None:
        """Start over when someone else moved the line to a version outside our lineage (a new
        fit published, a rollback): its reference image and statistics are what count now."""
        current = self.registry.current()
        if current is not None and current != self.state.version:
            log.warning("line %s: current model moved to v%d outside the updater (v%d): "
                        "starting over from it", self.streams.line, current, self.state.version)
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
        self.applied = set(self.state.applied)
        self.online = OnlineGlad(model, self.config.online)
        self.production = model
        self.gate = Gate(self.config.gate)

    def _restore(self, folder: Path, state: UpdaterState) -> None:
        working = GladModel.load(folder / "model", device=self.device)
        self.state = state
        self.online = OnlineGlad(working, self.config.online)
        self.production = GladModel.load(self.registry.path(state.version),
                                         backbone=working.backbone_)
        self.applied = set(state.applied)
        self.gate = Gate(self.config.gate)
        self.store.restore_gate(folder, self.gate)

    def _commit(self) -> None:
        self.state.applied = self.state.applied[-self.config.applied_memory:]
        self.store.commit(self.state, self.online.model(), self.gate)
