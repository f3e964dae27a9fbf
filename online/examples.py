"""What a confirmation trains or validates with: the confirmed frame's features and validity in
the working model's reference frame, found in the line's streams, a canary pasted on a held-back
frame, and the gate's examples as safe arrays (for the updater's committed state)."""

from __future__ import annotations

import logging
import zlib
from collections import OrderedDict

import numpy as np
import redis
import torch

from glad.errors import GladError
from glad.model import GladModel
from glad.validation import make_canaries
from online.gate import CANARY_SUFFIX, Example, Gate
from pipeline.errors import MessageError
from pipeline.payloads import message_features, message_validity
from pipeline.schema import Message, decode_entry, unpack_array, unpack_image
from pipeline.streams import Streams, as_text

log = logging.getLogger(__name__)


class FeedbackError(GladError):
    """A confirmation the updater cannot use (unknown, expired, other line...)."""


class RecentFrames:
    """The frames scored lately on a line, by frame id: their entries in the line's streams and
    the model versions that handled them (at most `size`, the oldest forgotten first)."""

    def __init__(self, client: redis.Redis, streams: Streams, size: int):
        self.client, self.streams, self.size = client, streams, size
        self._index: OrderedDict[str, dict] = OrderedDict()
        self._cursor = "$"

    def prime(self) -> None:
        """Read back the last `size` score messages."""
        recent = self.client.xrevrange(self.streams.key("scores"), count=self.size)
        for _, fields in reversed(recent):
            self._add(fields)
        self._cursor = as_text(recent[0][0]) if recent else "0-0"

    def refresh(self) -> None:
        """Take in the score messages written since the last look."""
        reply = self.client.xread({self.streams.key("scores"): self._cursor}, count=10_000)
        for entry_id, fields in (reply[0][1] if reply else []):
            self._add(fields)
            self._cursor = as_text(entry_id)

    def _add(self, fields: dict) -> None:
        try:
            message = decode_entry(fields, "score")
        except MessageError:
            return
        self._index[message.frame_id] = {"entries": message.meta.get("entries", {}),
                                         "models": message.models}
        self._index.move_to_end(message.frame_id)
        while len(self._index) > self.size:
            self._index.popitem(last=False)

    def example(self, frame_id: str, model: GladModel,
                lineage: list[int]) -> tuple[Example, np.ndarray | None]:
        """The frame's features and validity in `model`'s reference frame, and its registered
        image when still available (for canaries). Features are reused when a version of
        `lineage` (same reference image) aligned the frame; else the aligned image is
        re-extracted, else the raw frame registered again."""
        info = self._index.get(frame_id)
        if info is None:
            raise FeedbackError(f"unknown or expired frame id {frame_id!r}: not among the "
                                f"{len(self._index)} frames scored lately on line "
                                f"{self.streams.line}")
        size = model.backbone_.spec.input_size
        entries = info["entries"]
        same_reference = info["models"].get("align") in lineage
        aligned = self._entry("aligned", entries.get("aligned")) if same_reference else None
        if same_reference:
            features = self._entry("features", entries.get("features"))
            if features is not None and features.body["status"] == "ok":
                image = None if aligned is None else _aligned_image(aligned)
                return Example(frame_id, message_features(model, features),
                               message_validity(features, size)), image
        if aligned is not None and aligned.body["status"] == "ok":
            image, valid = _aligned_image(aligned), message_validity(aligned, size)
        else:
            frame = self._entry("frames", entries.get("frames"))
            if frame is None:
                raise FeedbackError(f"frame {frame_id!r} expired: its image, aligned image and "
                                    "features are no longer in the line's streams")
            registered, valids, alignments = model.register([unpack_image(frame.body["image"])])
            if alignments[0] is not None and not alignments[0].ok:
                raise FeedbackError(f"frame {frame_id!r} cannot be aligned on the reference "
                                    f"({alignments[0].reason}); it cannot train the model")
            image, valid = registered[0], valids[0]
        return Example(frame_id, extract(model, image), valid), image

    def _entry(self, hop: str, entry_id: str | None) -> Message | None:
        if not entry_id:
            return None
        found = self.client.xrange(self.streams.key(hop), entry_id, entry_id)
        if not found or not found[0][1]:
            return None
        try:
            return decode_entry(found[0][1])
        except MessageError:
            return None


def canary_of(example: Example, image: np.ndarray | None, model: GladModel) -> Example | None:
    """A synthetic defect pasted on a held-back normal frame (its region: valid pixels of the
    ROI) the way a fit makes its canaries (`glad.validation.make_canaries`), so the gate can
    check recall before any operator confirmed a defect. The defect is drawn from a generator
    seeded by the frame id, so a restart, a standby or a rerun pastes the same canary and the
    gate's decision can be reproduced. None without an image."""
    if image is None:
        return None
    region = example.valid & model.roi_.numpy()
    canaries, _ = make_canaries([image], [region], seed=zlib.crc32(example.frame_id.encode()))
    if not canaries:
        log.info("no canary from frame %s: no defect fits its valid region", example.frame_id)
        return None
    return Example(example.frame_id + CANARY_SUFFIX, extract(model, canaries[0]), example.valid)


def extract(model: GladModel, image: np.ndarray) -> list[np.ndarray]:
    """Per-layer float16 features (d, h, w) of one registered image."""
    features = model.backbone_.extract(image[None])
    return [f[0].to(torch.float16).cpu().numpy() for f in features]


def _aligned_image(message: Message) -> np.ndarray:
    return unpack_array(message.body["image"], "image", dtype="uint8", ndim=3)


def gate_arrays(gate: Gate) -> dict[str, np.ndarray]:
    """The gate's held-back frames and canaries as named arrays (a safetensors file)."""
    arrays = {}
    for kind, examples in (("held", gate.held_back), ("canary", gate.canaries)):
        for index, example in enumerate(examples):
            prefix = f"{kind}.{index:04d}."
            arrays[prefix + "id"] = np.frombuffer(example.frame_id.encode(), np.uint8).copy()
            arrays[prefix + "valid"] = np.packbits(example.valid)
            arrays[prefix + "side"] = np.array([example.valid.shape[0]], np.int64)
            for layer, array in enumerate(example.features):
                arrays[prefix + f"f{layer}"] = array
    return arrays or {"empty": np.zeros(0, np.uint8)}


def restore_gate(arrays: dict[str, np.ndarray], gate: Gate) -> None:
    """Put the examples `gate_arrays` wrote back into `gate`."""
    for kind, target in (("held", gate.held_back), ("canary", gate.canaries)):
        prefixes = sorted({k.rsplit(".", 1)[0] for k in arrays if k.startswith(kind + ".")})
        for prefix in prefixes:
            side = int(arrays[prefix + ".side"][0])
            valid = np.unpackbits(arrays[prefix + ".valid"])[: side * side].reshape(side, side)
            layers = sorted((k for k in arrays if k.startswith(prefix + ".f")),
                            key=lambda k: int(k.rsplit(".f", 1)[1]))
            target.append(Example(arrays[prefix + ".id"].tobytes().decode(),
                                  [arrays[k] for k in layers], valid.astype(bool)))
