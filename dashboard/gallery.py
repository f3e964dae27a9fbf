"""The latest anomalies, as a ring buffer: bounded whatever the anomaly rate.

Each item keeps its score message (with the heat map, ~128 KB at 256x256 float16). Overlay
pictures (the original frame, fetched from the frames stream while Redis retains it, beside its
heat map) are cached while the item is in the gallery; they are made (`dashboard.pictures`) when a
browser asks, or ahead of time within a budget (newest first), so thousands of anomalies a minute
cost the ring's turnover and a bounded amount of rendering.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.schema import Message


@dataclass
class Item:
    seq: int
    message: Message

    def record(self, verdict: str | None = None) -> dict:
        """The JSON form the page shows (no image bytes: those come from `image_url`)."""
        m, body = self.message, self.message.body
        return {"seq": self.seq, "frame_id": m.frame_id, "camera": m.camera,
                "captured_at": m.captured_at, "score": body["score"], "threshold": body["threshold"],
                "status": body["status"], "model": m.models.get("score"), "verdict": verdict}


class Gallery:
    """The `size` latest anomalous frames; thread-safe."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"gallery size must be at least 1, got {size}")
        self.size = size
        self._items: OrderedDict[str, Item] = OrderedDict()  # frame id -> item, oldest first
        self._pictures: dict[str, bytes] = {}  # frame id -> encoded overlay
        self._seq = 0
        self._lock = threading.Lock()

    def add(self, message: Message) -> None:
        """Keep `message` (an anomaly with a heat map); the oldest item leaves when full."""
        with self._lock:
            if message.frame_id in self._items:  # a re-delivered frame
                return
            self._seq += 1
            self._items[message.frame_id] = Item(self._seq, message)
            while len(self._items) > self.size:
                gone, _ = self._items.popitem(last=False)
                self._pictures.pop(gone, None)

    def since(self, seq: int) -> tuple[int, list[Item], list[str]]:
        """(latest sequence number, items added after `seq` newest first, ids of every item)."""
        with self._lock:
            items = [item for item in reversed(self._items.values()) if item.seq > seq]
            return self._seq, items, list(self._items)

    def unrendered(self, skip: set[str]) -> Message | None:
        """The newest item's message that has no picture yet and is not in `skip` (None when
        there is none)."""
        with self._lock:
            for frame_id, item in reversed(self._items.items()):
                if frame_id not in self._pictures and frame_id not in skip:
                    return item.message
        return None

    def picture(self, frame_id: str, render: Callable[[Message], bytes]) -> bytes | None:
        """The overlay of a gallery frame (rendered once, then cached); None for any other id."""
        with self._lock:
            item = self._items.get(frame_id)
            cached = self._pictures.get(frame_id)
        if item is None:
            return None
        if cached is not None:
            return cached
        picture = render(item.message)  # outside the lock: other requests go on meanwhile
        with self._lock:
            if frame_id in self._items:
                self._pictures[frame_id] = picture
        return picture
