"""Versioned models of a production line: immutable artifacts on disk, the current pointer in Redis.

Versions are numbered 1, 2, ... per line and stored under `{root}/{line}/v{N:04d}/` (the model
directory, content-hashed by its manifest). Publishing writes the artifact first, then flips
`glad:{line}:model:current` (one atomic SET) and announces the version on the line's events
stream, so a scorer never sees a pointer to a half-written model. Workers on other hosts need
the same `root` (a shared volume).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import msgpack
import redis

from glad.manifest import MANIFEST, read_manifest
from pipeline.errors import PipelineError
from pipeline.streams import Streams, publish_event

log = logging.getLogger(__name__)

STALE_S = 600.0  # a staging copy this old belongs to a publisher that died (copies take seconds)
POINTER_FILE = "CURRENT"  # the current version, on disk beside the version folders
RECORD = "record.json"  # a version's registry record, inside its folder
RETRY_REJECTED_S = 30.0  # a version that failed to load (e.g. files still syncing) is retried
DEFAULT_ROOT = Path(os.environ.get("GLAD_MODELS", "glad-data/models"))  # --models default


class ModelRegistry:
    """The model versions of one line."""

    def __init__(self, root: str | Path, client: redis.Redis, streams: Streams):
        self.root = Path(root)
        self.client = client
        self.streams = streams
        self.folder = self.root / streams.line

    @property
    def _current_key(self) -> str:
        return self.streams.model("current")

    @property
    def _versions_key(self) -> str:
        return self.streams.model("versions")

    @property
    def _history_key(self) -> str:
        return self.streams.model("history")

    def publish(self, model_dir: str | Path, note: str = "", parent: int | None = None,
                provenance: dict | None = None) -> int:
        """Copy a saved model in as the next version, make it current, announce it; a model
        that fails to load as a scorer would load it (see `_verify`) is refused first.

        `parent` is the version it was derived from; `provenance` holds what else explains it
        (the frame ids that trained it, validation figures...).
        """
        source = Path(model_dir)
        manifest = read_manifest(source)  # refuses anything that is not a GLAD model
        _verify(source)
        version, target = self._claim_folder(source)
        record = _record(manifest, version, target, note, parent, provenance or {})
        (target / RECORD).write_text(json.dumps(record, default=str))  # for `restore`
        self.client.hset(self._versions_key, str(version), msgpack.packb(record))
        self.set_current(version)
        log.info("line %s: model version %d published (%s)", self.streams.line, version, note)
        return version

    def _claim_folder(self, source: Path) -> tuple[int, Path]:
        """The next version number and its folder, holding a copy of `source`. Numbers come from
        a Redis counter but skip folders already on disk (the folder may outlive Redis's data)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            version = int(self.client.incr(self.streams.model("next")))
            on_disk = [int(p.name[1:]) for p in self.folder.glob("v[0-9]*") if p.name[1:].isdigit()]
            if on_disk and version <= max(on_disk):
                self.client.set(self.streams.model("next"), max(on_disk))
                continue
            target = self.path(version, must_exist=False)
            staging = self.folder / f".staging-{version}-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(source, staging)
            try:
                staging.rename(target)  # fails if another publisher took this number
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)
                continue
            return version, target

    def set_current(self, version: int) -> None:
        """Point the line at `version` (which must exist), remember the move, announce it."""
        self.path(version)
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self._current_key, version)
        pipe.rpush(self._history_key, version)
        pipe.execute()
        self._mark_current(version)
        publish_event(self.client, self.streams, "model_current", version=version)

    def _mark_current(self, version: int) -> None:
        """The pointer on disk too (atomic replace), so `restore` finds it after Redis lost it."""
        tmp = self.folder / f".{POINTER_FILE}.{os.getpid()}"
        tmp.write_text(str(version))
        os.replace(tmp, self.folder / POINTER_FILE)

    def forget_current(self) -> None:
        """Remove the on-disk pointer (a line started over: nothing to restore)."""
        (self.folder / POINTER_FILE).unlink(missing_ok=True)

    def restore(self) -> int | None:
        """After Redis lost the line's data (a restart without persistence): make the version
        the folder says was current current again, with every version's record and the number
        counter. Returns it; None when Redis still has a pointer or the folder has none. Safe to
        call from many workers at once (the first SET NX wins, the others only read)."""
        marker, current = self.folder / POINTER_FILE, self.current()
        if current is not None or not marker.is_file():
            return current
        version = int(marker.read_text())
        if not (self.path(version, must_exist=False) / MANIFEST).is_file():
            return None
        on_disk = []  # records first (any worker may write them): a pointer never precedes them
        for folder in sorted(self.folder.glob("v[0-9]*")):
            if folder.name[1:].isdigit() and (folder / MANIFEST).is_file():
                on_disk.append(int(folder.name[1:]))
                self.client.hsetnx(self._versions_key, str(on_disk[-1]),
                                   msgpack.packb(_record_on_disk(folder, on_disk[-1])))
        self.client.set(self.streams.model("next"), max(on_disk), nx=True)
        if not self.client.set(self._current_key, version, nx=True):
            return self.current()
        self.client.rpush(self._history_key, version)
        publish_event(self.client, self.streams, "model_current", version=version, restored=True)
        log.warning("line %s: Redis had lost the line's records (restarted without persistence?); "
                    "version %d is current again, from %s", self.streams.line, version, self.folder)
        return version

    def rollback(self) -> int:
        """Make the version that was current before the current one current again (repeatable:
        each rollback steps one further back through the history of current versions). Atomic
        against a concurrent publish or promote (WATCH on the history)."""

        def step_back(pipe) -> int:
            history = [int(v) for v in pipe.lrange(self._history_key, 0, -1)]
            if len(history) < 2:
                raise PipelineError(f"line {self.streams.line} has no earlier model version to "
                                    f"roll back to (current: {self.current()})")
            self.path(history[-2])
            pipe.multi()
            pipe.rpop(self._history_key)
            pipe.set(self._current_key, history[-2])
            return history[-2]

        previous = self.client.transaction(step_back, self._history_key, value_from_callable=True)
        self._mark_current(previous)
        publish_event(self.client, self.streams, "model_current", version=previous, rollback=True)
        return previous

    def record(self, version: int) -> dict:
        """The registry's record of `version` plus its model manifest."""
        packed = self.client.hget(self._versions_key, str(version))
        path = self.path(version)
        record = msgpack.unpackb(packed, raw=False) if packed else {"version": version,
                                                                    "path": str(path)}
        return record | {"manifest": read_manifest(path)}

    def current(self) -> int | None:
        """The line's current version, None when none was published."""
        value = self.client.get(self._current_key)
        return int(value) if value is not None else None

    def versions(self) -> list[dict]:
        """Every published version's record, oldest first."""
        records = [msgpack.unpackb(v, raw=False) for v in self.client.hvals(self._versions_key)]
        return sorted(records, key=lambda r: r["version"])

    def collect_garbage(self, stale_s: float = STALE_S) -> list[Path]:
        """Remove what publishers that died mid-publish left behind: staging copies older than
        `stale_s`, and version folders never recorded (the publisher died between the copy and
        the record) that are older than `stale_s` and numbered below a recorded version (so an
        emptied Redis, which records nothing, never costs a model). Returns what was removed."""
        if not self.folder.is_dir():
            return []
        recorded = {r["version"] for r in self.versions()}
        now = time.time()
        removed = []
        for path in self.folder.iterdir():
            number = path.name[1:]
            unrecorded = (path.name.startswith("v") and number.isdigit() and recorded
                          and int(number) not in recorded and int(number) < max(recorded))
            if not (path.name.startswith(".staging-") or unrecorded):
                continue
            if now - path.stat().st_mtime > stale_s:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        if removed:
            log.info("line %s: removed %d folders left by interrupted publishes: %s",
                     self.streams.line, len(removed), ", ".join(p.name for p in removed))
        return removed

    def path(self, version: int, must_exist: bool = True) -> Path:
        path = self.folder / f"v{version:04d}"
        if must_exist and not (path / "manifest.json").is_file():
            known = [r["version"] for r in self.versions()]
            raise PipelineError(f"line {self.streams.line} has no model version {version} under "
                                f"{self.folder} (known: {known or 'none'})")
        return path


class ModelFollower:
    """Keeps a worker on its line's current model: checks the pointer between batches (one GET)
    and loads a new version when it changes; the old one serves until the new one is ready, and
    stays at hand (`model_for`) for frames already in flight under it."""

    def __init__(self, registry: ModelRegistry, device: str = "cpu"):
        self.registry = registry
        self.device = device
        self.model = None
        self.version: int | None = None
        self._rejected: tuple[int, float] | None = None  # version, when it failed to load
        self._previous: dict[int, object] = {}  # the version served before the current one

    def model_for(self, version: int | None) -> tuple[object, int]:
        """The model of `version` (a frame aligned under it is scored by it), else the current
        one; returns (model, version used)."""
        if version is None or version == self.version:
            return self.model, self.version
        if version not in self._previous:
            try:
                self._previous = {version: self._load(version)}
            except Exception as error:
                log.warning("model version %s cannot be loaded (%s); using version %s", version,
                            error, self.version)
                return self.model, self.version
        return self._previous[version], version

    def refresh(self) -> bool:
        """True when a model is loaded (possibly a new version just now). A line whose pointer
        Redis lost is restored from the registry folder (`ModelRegistry.restore`)."""
        current = self.registry.current() or self.registry.restore()
        rejected = self._rejected is not None and self._rejected[0] == current and \
            time.monotonic() - self._rejected[1] < RETRY_REJECTED_S
        if current is None or current == self.version or rejected:
            return self.model is not None
        try:
            model = self._load(current)
        except Exception as error:  # a bad version must not stop a worker (files still syncing?)
            log.error("model version %s cannot be loaded (%s); %s", current, error,
                      f"staying on version {self.version}" if self.model is not None else
                      f"waiting, retrying in {RETRY_REJECTED_S:.0f} s")
            self._rejected = (current, time.monotonic())
            return self.model is not None
        if self.model is not None:
            self._previous = {self.version: self.model}
        previous, self.model, self.version = self.version, model, current
        log.info("line %s: now on model version %d (was %s)", self.registry.streams.line, current,
                 previous)
        return True

    def _load(self, version: int):
        """Load `version`, reusing the loaded backbone when the preprocessing is the same."""
        from glad.model import GladModel

        path = self.registry.path(version)
        backbone = None
        if self.model is not None:
            same = read_manifest(path)["preprocessing_hash"] == \
                self.model.backbone_.spec.preprocessing_hash()
            backbone = self.model.backbone_ if same else None
        return GladModel.load(path, backbone=backbone, device=self.device)


def _record_on_disk(folder: Path, version: int) -> dict:
    """A version's record as published (record.json), else a minimal one from its manifest."""
    try:
        return json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return _record(read_manifest(folder), version, folder, "restored from disk")


def _record(manifest: dict, version: int, path: Path, note: str, parent: int | None = None,
            provenance: dict | None = None) -> dict:
    """The registry's record of a version: what `glad models list` and the dashboard show."""
    return {"version": version, "sha256": manifest.get("arrays_sha256"),
            "backbone": manifest["backbone"]["name"], "threshold": manifest["threshold"],
            "created": time.time(), "note": note, "path": str(path), "parent": parent,
            "provenance": provenance or {}, "calibration": _calibration_summary(manifest)}


def _verify(model_dir: Path) -> None:
    """Load the model as a scorer will, before any scorer can be pointed at it: every manifest
    field and array is checked and the model must score its probe image as it did when saved
    (`glad.integrity`); raises ModelFileError otherwise. Imports torch, hence here."""
    from glad.model import GladModel

    GladModel.load(model_dir)


def _calibration_summary(manifest: dict) -> dict:
    """What the threshold promises (false alarms per normal part) and what it catches (recall of
    the fit's canaries), from the manifest; empty for models fitted before calibration."""
    calibration = manifest.get("calibration") or {}
    validation = manifest.get("validation") or {}
    summary = {"far": calibration.get("far"), "method": calibration.get("method"),
               "canary_recall": validation.get("recall"),
               "canary_auroc": validation.get("canary_auroc")}
    return {key: value for key, value in summary.items() if value is not None}
