"""What the online updater commits before it acknowledges confirmations, so that a restart (or a
standby taking over) resumes from it and never applies a confirmation twice."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.numpy import load_file, save_file

from glad.model import GladModel
from online.examples import gate_arrays, restore_gate
from online.gate import Gate

POINTER = "CURRENT"


@dataclass
class UpdaterState:
    """What survives a restart, besides the working model itself."""

    version: int  # registry version the working model descends from
    lineage: list[int]  # versions sharing its reference image (features aligned by them fit)
    base_components: list[int]  # K per layer of the lineage's first version
    last_entry: str = "0-0"  # last feedback entry applied
    applied: list[str] = field(default_factory=list)  # frame ids, oldest first
    trained: list[str] = field(default_factory=list)  # frames learned since the last publish
    confirmed_normal: int = 0
    updates: int = 0
    dirty: bool = False  # learned since the last gate decision
    generation: int = 0


class StateStore:
    """Committed states in `folder` (`{models}/{line}/updater/`): each commit is a new folder
    (the working model, the gate's examples, state.json), then the pointer file is switched to
    it with one atomic rename and older folders go."""

    def __init__(self, folder: Path, worker: str):
        self.folder, self.worker = folder, worker

    def commit(self, state: UpdaterState, model: GladModel, gate: Gate) -> None:
        name = f"state-{state.generation:06d}-{uuid.uuid4().hex[:8]}"
        target = self.folder / name
        model.save(target / "model")
        save_file(gate_arrays(gate), str(target / "memory.safetensors"))
        (target / "state.json").write_text(json.dumps(state.__dict__))
        tmp = self.folder / f".{POINTER}.{self.worker}"
        tmp.write_text(name)
        os.replace(tmp, self.folder / POINTER)
        for old in self.folder.glob("state-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> tuple[Path, UpdaterState] | None:
        """The last committed state's folder and record (None before the first commit)."""
        pointer = self.folder / POINTER
        if not pointer.is_file():
            return None
        folder = self.folder / pointer.read_text().strip()
        return folder, UpdaterState(**json.loads((folder / "state.json").read_text()))

    @staticmethod
    def restore_gate(folder: Path, gate: Gate) -> None:
        """Put a committed state's held-back frames and canaries back into `gate`."""
        memory = folder / "memory.safetensors"
        if memory.is_file():
            restore_gate(load_file(str(memory)), gate)

    def staging(self) -> Path:
        """Where this updater writes a candidate before the registry copies it in."""
        return self.folder / f".publish-{self.worker}"

    def remove_leftovers(self) -> None:
        """Remove candidates a previous leader was writing when it was killed."""
        for leftover in self.folder.glob(".publish-*"):
            shutil.rmtree(leftover, ignore_errors=True)
