"""The message schema: round trips and every way a message can be malformed (no Redis needed)."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from pipeline.errors import MessageError
from pipeline.schema import (
    FIELD,
    Message,
    decode,
    decode_entry,
    pack_array,
    pack_image,
    pack_mask,
    unpack_array,
    unpack_image,
)
from stages.capture import encode_frame


def frame_message(image: np.ndarray) -> Message:
    return Message("frame", "cam-1", "line1", "cam", 1700000000.0,
                   {"image": encode_frame(image, "png")}, meta={"label": "normal"})


def test_round_trip_keeps_envelope_and_pixels() -> None:
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    message = frame_message(image)
    message.timings["capture"] = 1.5
    back = decode(message.encode(), "frame")
    assert (back.frame_id, back.line, back.camera, back.captured_at) == \
        ("cam-1", "line1", "cam", 1700000000.0)
    assert back.meta == {"label": "normal"} and back.timings == {"capture": 1.5}
    assert np.array_equal(unpack_image(back.body["image"]), image)  # PNG is lossless


def test_arrays_and_masks_round_trip() -> None:
    features = np.random.default_rng(1).normal(size=(24, 8, 8)).astype(np.float16)
    assert np.array_equal(unpack_array(pack_array(features), "f", "float16", 3), features)
    mask = np.random.default_rng(2).random((37, 41)) > 0.5  # not a multiple of 8 bits
    assert np.array_equal(unpack_array(pack_mask(mask), "valid", "bool", 2), mask)
    image = np.zeros((40, 40, 3), np.uint8)
    assert unpack_image(pack_array(image)).shape == (40, 40, 3)


def test_derive_copies_the_envelope() -> None:
    message = frame_message(np.zeros((40, 40, 3), np.uint8))
    message.models["align"] = 3
    derived = message.derive("score", {"score": 1.0})
    derived.models["score"] = 4
    assert derived.frame_id == message.frame_id and derived.kind == "score"
    assert message.models == {"align": 3}  # the original is untouched


@pytest.mark.parametrize("data, reason", [
    (b"\xc1\x00garbage", "not a msgpack message"),
    (msgpack.packb([1, 2, 3]), "not a map"),
    (msgpack.packb({"v": 99, "kind": "frame"}), "unknown schema version 99"),
    (msgpack.packb({"v": 1, "kind": "teleport"}), "unknown message kind"),
    (msgpack.packb({"v": 1, "kind": "frame", "id": "", "line": "l", "camera": "c", "ts": 1.0,
                    "models": {}, "timings": {}, "stamps": {}, "meta": {}, "body": {"image": {}}}),
     "empty frame id"),
    (msgpack.packb({"v": 1, "kind": "frame", "id": "a", "line": "l", "camera": "c", "ts": 1.0,
                    "models": {}, "timings": {}, "stamps": {}, "meta": {}, "body": {}}),
     "has no 'image'"),
    (msgpack.packb({"v": 1, "kind": "frame", "id": "a", "line": "l", "camera": "c", "ts": "x",
                    "models": {}, "timings": {}, "stamps": {}, "meta": {}, "body": {}}),
     "'ts' is a str"),
])
def test_malformed_messages_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(MessageError, match=reason):
        decode(data)


def test_kind_and_field_checks() -> None:
    packed = frame_message(np.zeros((40, 40, 3), np.uint8)).encode()
    with pytest.raises(MessageError, match="expected a 'score' message"):
        decode(packed, "score")
    with pytest.raises(MessageError, match="without the 'm' field"):
        decode_entry({b"other": packed})
    assert decode_entry({FIELD: packed}).kind == "frame"


@pytest.mark.parametrize("payload, reason", [
    ({"enc": "raw", "dtype": "uint8", "shape": [10, 10, 3], "data": b"\x00" * 299}, "299 bytes"),
    ({"enc": "raw", "dtype": "object", "shape": [1], "data": b"\x00"}, "not part of the schema"),
    ({"enc": "raw", "dtype": "uint8", "shape": [-1], "data": b""}, "bad array shape"),
    ({"enc": "lz4", "shape": [1], "data": b"\x00"}, "unknown array encoding"),
    ({"enc": "raw", "dtype": "uint8", "shape": [40, 40, 2], "data": b"\x00" * 3200},
     "is not an image"),
    ({"enc": "raw", "dtype": "float32", "shape": [40, 40], "data": b"\x00" * 6400},
     "dtype float32, expected uint8"),
    (pack_image(b"\x89PNG\r\n\x1a\nnot really", "png"), "not a readable image"),
])
def test_bad_image_payloads(payload: dict, reason: str) -> None:
    with pytest.raises(MessageError, match=reason):
        unpack_image(payload)


def test_truncated_png_is_refused() -> None:
    image = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode_frame(image, "png")["data"]
    with pytest.raises(MessageError, match="truncated|not a readable"):
        unpack_image(pack_image(data[: len(data) * 2 // 3], "png"))


@pytest.mark.parametrize("field, value, reason", [
    ("timings", {"align": "fast"}, "'timings' has a bad entry 'align'"),
    ("stamps", {"capture": float("nan")}, "'stamps' has a bad entry"),
    ("stamps", {"capture": True}, "'stamps' has a bad entry"),
    ("models", {"score": [1]}, "'models' has a bad entry 'score'"),
    ("meta", {"name": {"a": 1}}, "meta 'name' is a dict"),
    ("meta", {"index": "7"}, "meta 'index' is a str"),
    ("meta", {"entries": {"frames": 5}}, "meta 'entries' must map"),
])
def test_envelope_maps_are_type_checked(field: str, value: dict, reason: str) -> None:
    """A frame with an envelope a later stage would trip over fails where it enters, not in the
    result writer after it was scored (issue 13, hole 11)."""
    message = frame_message(np.zeros((8, 8, 3), np.uint8))
    setattr(message, field, value)
    with pytest.raises(MessageError, match=reason):
        decode(message.encode())
