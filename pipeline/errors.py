"""Errors of the streaming layer; each prints as one line through the `glad` command."""

from __future__ import annotations

from glad.errors import GladError


class MessageError(GladError):
    """A stream message that cannot be used: not msgpack, unknown schema version, missing or
    mistyped fields, arrays whose bytes do not match their dtype and shape. Never retried: it
    goes to the dead-letter stream with this error's text as the reason."""


class RedisUnavailableError(GladError):
    """Redis cannot be reached (after retrying with backoff) or refuses the credentials."""


class PipelineError(GladError):
    """A pipeline that cannot start: a model or source that does not exist, a bad option."""


class Backpressure(PipelineError):
    """A producer waited too long for room: the line's stages have more frames in flight than the
    backlog bound allows (frames are never appended past it, so stream trimming loses nothing)."""
