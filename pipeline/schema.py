"""The versioned msgpack message schema of every stream, and its validation.

A stream entry has one field, `m`: a msgpack map with the envelope (schema version, kind, frame
id, line, camera, capture time, model versions used so far, per-stage work time and write time,
free metadata) and a body whose fields depend on the kind. Arrays travel as raw bytes + dtype +
shape ("raw"), bit-packed masks ("bits") or encoded images ("png", "jpeg", ...); never pickle.
Decoding checks everything and raises `MessageError` with a reason that fits in a log line.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from pipeline.errors import MessageError

SCHEMA_VERSION = 1
FIELD = b"m"
MAX_SIDE = 16384
ARRAY_DTYPES = {"uint8", "bool", "float16", "float32", "float64", "int32", "int64"}
IMAGE_FORMATS = {"png", "jpeg", "bmp", "tiff", "webp"}

# Body fields per kind: name -> (accepted types, required)
_ARRAY = (dict,)
_OPTIONAL_ARRAY = (dict, type(None))
BODIES: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "frame": {"image": (_ARRAY, True)},
    "aligned": {"image": (_ARRAY, True), "valid": (_OPTIONAL_ARRAY, False),
                "warp": (_OPTIONAL_ARRAY, False), "status": ((str,), True),
                "frame_shape": ((list,), True)},
    "features": {"features": ((list,), True), "backbone": ((str,), True),
                 "valid": (_OPTIONAL_ARRAY, False),
                 "warp": (_OPTIONAL_ARRAY, False), "status": ((str,), True),
                 "frame_shape": ((list,), True)},
    "score": {"score": ((float, int), True), "anomalous": ((bool,), True),
              "threshold": ((float, int), True), "status": ((str,), True),
              "heatmap": (_OPTIONAL_ARRAY, False), "frame_shape": ((list,), True)},
    "feedback": {"verdict": ((str,), True), "by": ((str,), False), "note": ((str,), False)},
}


@dataclass
class Message:
    """One message of a stream: the envelope and a kind-specific body (see `BODIES`)."""

    kind: str
    frame_id: str
    line: str
    camera: str
    captured_at: float
    body: dict[str, Any]
    models: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # ms of work per stage
    stamps: dict[str, float] = field(default_factory=dict)  # unix time each stage wrote it
    meta: dict[str, Any] = field(default_factory=dict)  # label, file name, source entry ids...

    def derive(self, kind: str, body: dict[str, Any]) -> Message:
        """The next hop's message for this frame: same envelope, new kind and body."""
        return Message(kind, self.frame_id, self.line, self.camera, self.captured_at, body,
                       dict(self.models), dict(self.timings), dict(self.stamps), dict(self.meta))

    def encode(self) -> bytes:
        return msgpack.packb({
            "v": SCHEMA_VERSION, "kind": self.kind, "id": self.frame_id, "line": self.line,
            "camera": self.camera, "ts": float(self.captured_at), "models": self.models,
            "timings": self.timings, "stamps": self.stamps, "meta": self.meta, "body": self.body,
        }, use_bin_type=True)

    def latency_ms(self, now: float | None = None) -> float:
        """Milliseconds since capture."""
        return 1000.0 * ((time.time() if now is None else now) - self.captured_at)


def decode(data: bytes, kind: str | None = None) -> Message:
    """Parse and validate one packed message (of `kind`, when given)."""
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as error:
        raise MessageError(f"not a msgpack message: {type(error).__name__}: {error}") from None
    if not isinstance(raw, dict):
        raise MessageError(f"message is a msgpack {type(raw).__name__}, not a map")
    if raw.get("v") != SCHEMA_VERSION:
        raise MessageError(f"unknown schema version {raw.get('v')!r} (this worker reads "
                           f"version {SCHEMA_VERSION})")
    got = raw.get("kind")
    if got not in BODIES:
        raise MessageError(f"unknown message kind {got!r}")
    if kind is not None and got != kind:
        raise MessageError(f"expected a {kind!r} message, got {got!r}")
    _check(raw, "id", str)
    if not raw["id"]:
        raise MessageError("empty frame id")
    for name in ("line", "camera"):
        _check(raw, name, str)
    _check(raw, "ts", (float, int))
    if not math.isfinite(raw["ts"]):
        raise MessageError("capture time is not finite")
    for name in ("models", "timings", "stamps", "meta", "body"):
        _check(raw, name, dict)
    _check_envelope(raw)
    body = raw["body"]
    for name, (types, required) in BODIES[got].items():
        if name not in body:
            if required:
                raise MessageError(f"{got} message {raw['id']!r} has no {name!r}")
            body[name] = None
        elif not isinstance(body[name], types):
            raise MessageError(f"{got} message {raw['id']!r}: {name!r} is a "
                               f"{type(body[name]).__name__}")
    return Message(got, raw["id"], raw["line"], raw["camera"], float(raw["ts"]), body,
                   raw["models"], raw["timings"], raw["stamps"], raw["meta"])


def decode_entry(fields: dict, kind: str | None = None) -> Message:
    """Decode a stream entry's fields ({b"m": packed message})."""
    if FIELD not in fields:
        raise MessageError(f"stream entry without the {FIELD.decode()!r} field "
                           f"(fields: {sorted(k.decode(errors='replace') for k in fields)})")
    return decode(fields[FIELD], kind)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_version(value) -> bool:
    return value is None or isinstance(value, str) or (isinstance(value, int)
                                                       and not isinstance(value, bool))


# Envelope maps whose values later stages compute with: name -> test of each value
ENVELOPE_VALUES = {"timings": _is_number, "stamps": _is_number, "models": _is_version}
# Metadata the stages and result writers read: name -> accepted types (other keys are free)
META_FIELDS = {"name": (str,), "label": (str,), "index": (int,), "entries": (dict,)}


def _check_envelope(raw: dict) -> None:
    """Refuse envelope maps a later stage would trip over: a frame must fail where it enters,
    not in the result writer after it was scored."""
    for name, valid in ENVELOPE_VALUES.items():
        for key, value in raw[name].items():
            if not isinstance(key, str) or not valid(value):
                raise MessageError(f"message field {name!r} has a bad entry {key!r}: "
                                   f"{type(value).__name__} {str(value)[:40]!r}")
    meta = raw["meta"]
    for key, types in META_FIELDS.items():
        value = meta.get(key)
        if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
            raise MessageError(f"message meta {key!r} is a {type(value).__name__}")
    entries = meta.get("entries") or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in entries.items()):
        raise MessageError("message meta 'entries' must map stream names to entry ids")


def _check(raw: dict, name: str, types) -> None:
    if name not in raw:
        raise MessageError(f"message has no {name!r}")
    if not isinstance(raw[name], types) or isinstance(raw[name], bool) and types is not bool:
        raise MessageError(f"message field {name!r} is a {type(raw[name]).__name__}")


# --- arrays ---------------------------------------------------------------------------------


def pack_array(array: np.ndarray) -> dict:
    """A numpy array as {"enc": "raw", "dtype", "shape", "data"}."""
    array = np.ascontiguousarray(array)
    if array.dtype.name not in ARRAY_DTYPES:
        raise ValueError(f"arrays of dtype {array.dtype} are not part of the schema")
    return {"enc": "raw", "dtype": array.dtype.name, "shape": list(array.shape),
            "data": array.tobytes()}


def pack_mask(mask: np.ndarray) -> dict:
    """A boolean mask as {"enc": "bits", "shape", "data"} (8 pixels per byte)."""
    mask = np.asarray(mask, dtype=bool)
    return {"enc": "bits", "shape": list(mask.shape), "data": np.packbits(mask).tobytes()}


def pack_image(data: bytes, image_format: str) -> dict:
    """Encoded image bytes (PNG, JPEG, ...) as {"enc": format, "data"}."""
    return {"enc": image_format, "data": bytes(data)}


def unpack_array(packed: Any, name: str, dtype: str | None = None,
                 ndim: int | None = None) -> np.ndarray:
    """The array of a "raw" or "bits" payload, checked against `dtype` and `ndim`."""
    if not isinstance(packed, dict):
        raise MessageError(f"{name}: expected an array map, got {type(packed).__name__}")
    enc = packed.get("enc")
    shape = _shape(packed, name)
    data = packed.get("data")
    if not isinstance(data, bytes):
        raise MessageError(f"{name}: array data is not bytes")
    if enc == "bits":
        count = math.prod(shape)
        if len(data) != (count + 7) // 8:
            raise MessageError(f"{name}: {len(data)} bytes for a {shape} bit mask")
        array = np.unpackbits(np.frombuffer(data, np.uint8), count=count).astype(bool)
        array = array.reshape(shape)
    elif enc == "raw":
        kind = packed.get("dtype")
        if kind not in ARRAY_DTYPES:
            raise MessageError(f"{name}: dtype {kind!r} is not part of the schema")
        expected = math.prod(shape) * np.dtype(kind).itemsize
        if len(data) != expected:
            raise MessageError(f"{name}: {len(data)} bytes for a {kind} array of shape {shape} "
                               f"({expected} expected)")
        array = np.frombuffer(data, dtype=kind).reshape(shape)
    else:
        raise MessageError(f"{name}: unknown array encoding {enc!r}")
    if dtype is not None and array.dtype.name != dtype:
        raise MessageError(f"{name}: dtype {array.dtype.name}, expected {dtype}")
    if ndim is not None and array.ndim != ndim:
        raise MessageError(f"{name}: shape {list(array.shape)}, expected {ndim} dimensions")
    return array


def unpack_image(packed: Any, name: str = "image") -> np.ndarray:
    """An RGB uint8 image (H, W, 3) from a raw array or encoded bytes; `MessageError` if bad."""
    from glad.errors import ImageError
    from glad.images import as_rgb, decode_image

    if isinstance(packed, dict) and packed.get("enc") in IMAGE_FORMATS:
        data = packed.get("data")
        if not isinstance(data, bytes) or not data:
            raise MessageError(f"{name}: encoded image without bytes")
        try:
            return decode_image(data)
        except ImageError as error:
            raise MessageError(f"{name}: {error}") from None
    array = unpack_array(packed, name, dtype="uint8")
    if array.ndim not in (2, 3) or array.ndim == 3 and array.shape[2] not in (1, 3, 4):
        raise MessageError(f"{name}: shape {list(array.shape)} is not an image (H, W[, 1|3|4])")
    try:
        return as_rgb(array)
    except ImageError as error:
        raise MessageError(f"{name}: {error}") from None


def _shape(packed: dict, name: str) -> list[int]:
    shape = packed.get("shape")
    if (not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape)
            or any(s > MAX_SIDE * MAX_SIDE for s in shape)):
        raise MessageError(f"{name}: bad array shape {shape!r}")
    return shape
