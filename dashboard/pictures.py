"""The gallery's overlay pictures: an anomalous frame (fetched from the frames stream while
Redis retains it) beside its heat map, as one JPEG. A browser's request makes one at once; a
background thread makes the newest ahead of requests, within a budget of pictures a second."""

from __future__ import annotations

import logging
import threading
import time

import redis

from dashboard.gallery import Gallery
from glad.heatmap import encode_jpeg, side_by_side
from pipeline.errors import MessageError
from pipeline.results import anomaly_view
from pipeline.schema import Message
from pipeline.streams import Streams

log = logging.getLogger(__name__)


class Pictures:
    """Pictures of `gallery`'s frames, made from one line's streams (cached by the gallery)."""

    def __init__(self, client: redis.Redis, streams: Streams, gallery: Gallery):
        self.client, self.streams, self.gallery = client, streams, gallery

    def get(self, frame_id: str) -> bytes | None:
        """JPEG of a gallery frame beside its heat-map overlay; None when it is not in the gallery."""
        return self.gallery.picture(frame_id, self._render)

    def render_ahead(self, per_s: float, stop_event: threading.Event) -> None:
        """Make the newest gallery pictures before a browser asks (a page with a full gallery
        then loads at once), at most `per_s` a second, so a flood of anomalies costs a bounded
        share of a core; returns when `stop_event` is set."""
        interval = 1.0 / per_s
        failed: set[str] = set()  # not retried ahead of time (a request still may)
        while not stop_event.is_set():
            message = self.gallery.unrendered(failed)
            if message is None:
                stop_event.wait(0.1)
                continue
            started = time.monotonic()
            try:
                self.get(message.frame_id)
            except (MessageError, ValueError, redis.RedisError) as error:
                log.debug("dashboard: no picture for %s: %s", message.frame_id, error)
                if len(failed) > 4 * self.gallery.size:
                    failed.clear()
                failed.add(message.frame_id)
            stop_event.wait(max(0.0, interval - (time.monotonic() - started)))

    def _render(self, message: Message) -> bytes:
        frame, heatmap = anomaly_view(self.client, self.streams, message)
        return encode_jpeg(side_by_side(frame, heatmap, message.body["threshold"]))
