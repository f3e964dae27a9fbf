"""Operator feedback: "this frame is normal" / "this frame is a defect", on the line's feedback
stream. Only confirmed normals ever train the model (the online updater reads this stream);
frames the detector merely accepted never do."""

from __future__ import annotations

import time

import redis

from pipeline.errors import MessageError
from pipeline.schema import FIELD, Message
from pipeline.streams import DEFAULT_MAXLEN, Streams

VERDICTS = ("normal", "anomalous")


def confirm(client: redis.Redis, line: str, frame_id: str, verdict: str, by: str = "operator",
            note: str = "") -> str:
    """Append one confirmation to `line`'s feedback stream; returns its entry id."""
    if verdict not in VERDICTS:
        raise MessageError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
    if not frame_id or len(frame_id) > 256:
        raise MessageError(f"bad frame id {frame_id!r}")
    message = Message("feedback", frame_id, line, "", time.time(),
                      {"verdict": verdict, "by": by, "note": note})
    streams = Streams(line)
    entry = client.xadd(streams.key("feedback"), {FIELD: message.encode()},
                        maxlen=DEFAULT_MAXLEN["feedback"], approximate=True)
    return entry.decode() if isinstance(entry, bytes) else str(entry)


def verdict_of(message: Message) -> str:
    """The checked verdict of a feedback message."""
    verdict = message.body["verdict"]
    if verdict not in VERDICTS:
        raise MessageError(f"feedback for {message.frame_id!r}: unknown verdict {verdict!r}")
    return verdict
