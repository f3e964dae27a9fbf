"""The capture stage: a camera, video, stream, image folder or the synthetic camera -> frames.

Frames are paced (`fps`), encoded (PNG by default: lossless and a fraction of the raw size; image
files travel as their own bytes) and appended to the line's frames stream. Capture waits while
the align stage has more than `max_backlog` frames in flight, so bounded streams never drop a frame
nobody has read, and it survives Redis going away: the frame in hand is sent once Redis is back.
`publish_frame` is the same path for external producers.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import cv2
import numpy as np
import redis

from glad.errors import GladError
from glad.images import LINE_JPEG_QUALITY
from pipeline.schema import FIELD, Message, pack_array, pack_image
from pipeline.service import Service
from pipeline.streams import (
    DEFAULT_MAXLEN,
    Streams,
    beat,
    publish_event,
    trim_finished,
    wait_for_room,
)
from stages.sources import SourceFrame

log = logging.getLogger(__name__)

ENCODINGS = ("png", "jpeg", "raw")
HEARTBEAT_S = 2.0
PRODUCER_BACKLOG = 256  # frames in flight an external producer may run ahead of align
PRODUCER_TIMEOUT_S = 30.0  # how long publish_frame waits for room before raising Backpressure
TRIM_SLACK = 200  # entries approximate trimming may keep above maxlen (whole nodes of 100)


def encode_frame(image: np.ndarray, encoding: str = "png") -> dict:
    """An RGB uint8 image as a message payload: PNG (fast level), JPEG (`LINE_JPEG_QUALITY`,
    which models' default noise floor covers) or raw."""
    if encoding == "raw":
        return pack_array(image)
    ext, params = (".png", [cv2.IMWRITE_PNG_COMPRESSION, 1]) if encoding == "png" else \
        (".jpg", [cv2.IMWRITE_JPEG_QUALITY, LINE_JPEG_QUALITY])
    ok, data = cv2.imencode(ext, np.ascontiguousarray(image[:, :, ::-1]), params)
    if not ok:
        raise GladError(f"cannot encode a {image.shape} frame as {encoding}")
    return pack_image(data.tobytes(), encoding)


def publish_frame(client: redis.Redis, line: str, image: np.ndarray | None = None,
                  encoded: bytes | None = None, frame_id: str | None = None,
                  camera: str = "client", meta: dict[str, Any] | None = None,
                  captured_at: float | None = None, encoding: str = "png",
                  maxlen: int = DEFAULT_MAXLEN["frames"], max_backlog: int | None = PRODUCER_BACKLOG,
                  timeout: float | None = PRODUCER_TIMEOUT_S) -> str:
    """Append one frame to `line`'s frames stream; returns its frame id.

    Pass `image` (RGB uint8 array) or `encoded` (PNG/JPEG file bytes). Frame ids must be unique
    per line: a repeated id is scored once. While the align stage has more than `max_backlog`
    frames in flight this waits, and raises `Backpressure` after `timeout` seconds (None: waits
    as long as it takes), so the stream's MAXLEN never trims a frame nobody has read.
    `max_backlog=None` skips the wait (for a caller that waited itself, as capture does).
    """
    if (image is None) == (encoded is None):
        raise ValueError("pass exactly one of image= or encoded=")
    if max_backlog is not None and max_backlog > maxlen - TRIM_SLACK:
        raise ValueError(f"max_backlog {max_backlog} leaves no room under maxlen {maxlen}")
    streams = Streams(line)
    if max_backlog is not None:
        wait_for_room(client, streams, "frames", max_backlog, timeout=timeout)
    captured_at = time.time() if captured_at is None else captured_at
    frame_id = frame_id or f"{camera}-{uuid.uuid4().hex}"
    payload = encode_frame(image, encoding) if image is not None else \
        pack_image(encoded, _format_of(encoded))
    message = Message("frame", frame_id, line, camera, captured_at, {"image": payload},
                      meta=dict(meta or {}))
    message.stamps["capture"] = time.time()
    pipe = client.pipeline(transaction=True)
    pipe.xadd(streams.key("frames"), {FIELD: message.encode()})
    pipe.hincrby(streams.counters, "frames:added", 1)
    pipe.xlen(streams.key("frames"))
    trim_finished(client, streams, "frames", pipe.execute()[-1], maxlen)
    return frame_id


class Capture(Service):
    """Publishes a source's frames to a line until the source ends or `stop` is set; waits
    Redis out with the frame in hand (see `pipeline.service.Service`)."""

    name = "capture"

    def __init__(self, client: redis.Redis, url: str, line: str, encoding: str = "png",
                 max_backlog: int = 16, stop: threading.Event | None = None):
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}")
        super().__init__(client, url, stop)
        self.streams = Streams(line)
        self.encoding = encoding
        self.max_backlog = max_backlog
        self.session = f"{int(time.time() * 1000):x}"
        self.published = 0
        self.worker = f"capture-{socket.gethostname()}-{os.getpid()}-{self.session[-4:]}"
        self.camera = "capture"
        self._frames: Iterator[SourceFrame] = iter(())
        self._in_hand: tuple[SourceFrame, float] | None = None  # a frame and its capture time
        self._last_heartbeat = 0.0

    def run(self, frames: Iterable[SourceFrame]) -> int:
        """Publish every frame, then announce the end of the source on the events stream;
        returns how many frames were published."""
        self._frames = iter(frames)
        super().run()
        return self.published

    def step(self) -> int:
        if self._in_hand is None:
            frame = next(self._frames, None)
            if frame is None:
                publish_event(self.client, self.streams, "source_ended", camera=self.camera,
                              frames=self.published)
                log.info("source %s ended after %d frames", self.camera, self.published)
                self.done = True
                return 0
            self._in_hand = (frame, time.time())
        frame, captured_at = self._in_hand
        self.camera = frame.camera
        if not wait_for_room(self.client, self.streams, "frames", self.max_backlog,
                             stop=self.stop_event):
            return 0
        meta = {"index": frame.index} | ({"name": frame.name} if frame.name is not None else {}) \
            | ({"label": frame.label} if frame.label is not None else {})
        publish_frame(self.client, self.streams.line, image=frame.image, encoded=frame.encoded,
                      frame_id=f"{frame.camera}-{self.session}-{frame.index:07d}",
                      camera=frame.camera, meta=meta, captured_at=captured_at,
                      encoding=self.encoding, max_backlog=None)
        self._in_hand = None
        self.published += 1
        if time.monotonic() - self._last_heartbeat > HEARTBEAT_S:
            self._last_heartbeat = time.monotonic()
            self._heartbeat()
        return 1

    def teardown(self) -> None:
        self.client.hdel(self.streams.workers, self.worker)

    def _heartbeat(self) -> None:
        """The same record as stage workers write, so `glad status` shows cameras too."""
        beat(self.client, self.streams, self.worker, "capture", int(self.session, 16) / 1000,
             state="running", processed=self.published, deadlettered=0, claimed=0,
             reconnects=self.reconnects, model=None, camera=self.camera)


def _format_of(data: bytes) -> str:
    """The image format of file bytes, from their magic number (decoding happens downstream)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:2] == b"\xff\xd8":
        return "jpeg"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "png"  # unknown bytes: the align stage rejects them with a clear reason
