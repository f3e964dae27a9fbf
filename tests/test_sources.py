"""Tests of the capture stage's frame sources (stages.sources): real files, real OpenCV, no mocks."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

import cv2
import numpy as np
import pytest

from glad import synth
from glad.errors import GladError
from pipeline.connection import Backoff
from stages.sources import SourceError, SourceFrame, VideoSource, open_source, paced

FAST = Backoff(initial=0.05, maximum=0.1)


def _write_video(path: Path, n: int = 10) -> Path:
    """An MJPG video of `n` 64x48 frames: red 200, blue 20, green 20 * index (BGR order on disk)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    assert writer.isOpened()
    for index in range(n):
        writer.write(np.full((48, 64, 3), (20, 20 * index, 200), np.uint8))
    writer.release()
    return path


def _write_images(folder: Path) -> dict[str, bytes]:
    """Two PNGs, a JPEG, a corrupt PNG and a text file; return the image files' bytes by name."""
    folder.mkdir()
    for name, value in [("b.png", 10), ("a.png", 20), ("c.jpg", 30)]:
        assert cv2.imwrite(str(folder / name), np.full((40, 40, 3), value, np.uint8))
    (folder / "d_broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("not an image")
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix != ".txt"}


def _wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# --------------------------------------------------------------------------------------------
# Synthetic camera
# --------------------------------------------------------------------------------------------


def test_synth_frames_are_labelled_reproducible_and_end() -> None:
    uri = "synth://nut?frames=20&defect_rate=0.5&seed=3&size=64"
    first, second = list(open_source(uri)), list(open_source(uri))
    assert [f.index for f in first] == list(range(20))
    for a, b in zip(first, second, strict=True):
        assert a.camera == "synth" and a.encoded is None
        assert a.image.shape == (64, 64, 3) and a.image.dtype == np.uint8
        assert np.array_equal(a.image, b.image) and a.label == b.label
    labels = {f.label for f in first}
    assert "normal" in labels and labels - {"normal"}
    assert labels <= {"normal", *synth.defect_types("nut")}
    other_seed = next(iter(open_source("synth://nut?frames=1&seed=4&size=64")))
    assert not np.array_equal(other_seed.image, first[0].image)


def test_synth_defaults_loop_and_camera() -> None:
    with open_source("synth://?size=64&frames=3", loop=True, camera="line1") as source:
        frames = list(islice(source, 7))
    assert [f.index for f in frames] == list(range(7))
    assert np.array_equal(frames[3].image, frames[0].image) and frames[0].camera == "line1"
    endless = open_source("synth://weave?size=64&defect_rate=0")
    assert len(list(islice(endless, 25))) == 25
    assert {f.label for f in islice(endless, 5)} == {"normal"}


@pytest.mark.parametrize(
    "uri, message",
    [
        ("synth://bolt", "unknown category"),
        ("synth://nut?fps=3", "unknown parameter"),
        ("synth://nut?size=big", "not a valid int"),
        ("synth://nut?size=16", "too small"),
        ("synth://nut?defect_rate=2", "not in [0, 1]"),
        ("synth://nut?variant=gold", "unknown variant 'gold' for 'nut'"),
        ("synth://weave?variant=relabelled", "unknown variant 'relabelled' for 'weave'"),
        ("synth://nut?variant=", "unknown variant ''"),
        ("synth://nut?variant=recoloured&variant_from=-1", "variant_from -1 is negative"),
        ("synth://nut?variant=recoloured&variant_from=x", "not a valid int"),
        ("synth://nut?variant_from=5", "no variant"),
    ],
)
def test_synth_bad_uris(uri: str, message: str) -> None:
    with pytest.raises(SourceError, match=message.replace("[", r"\[").replace("]", r"\]")):
        open_source(uri)


def _differ(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over the pixels of the largest change over the channels."""
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=2).mean())


def test_synth_variant_from_switches_the_parts_at_that_frame() -> None:
    plain = list(open_source("synth://pcb?frames=6&defect_rate=0&seed=2&size=64"))
    switched = list(open_source("synth://pcb?frames=6&defect_rate=0&seed=2&size=64&variant=recoloured&variant_from=3"))
    assert [f.label for f in switched] == ["normal"] * 6, "a variant is a normal part"
    for old, new in zip(plain[:3], switched[:3], strict=True):
        assert np.array_equal(old.image, new.image)
    for old, new in zip(plain[3:], switched[3:], strict=True):
        assert _differ(old.image, new.image) >= 20, new.index
    rng = np.random.default_rng(np.random.SeedSequence([2, 4]))  # frame 4 of seed 2, no defect drawn
    rng.random()
    assert np.array_equal(switched[4].image, synth.render_normal("pcb", rng, 64, "recoloured"))


def test_synth_variant_defaults_to_every_frame_and_keeps_defects() -> None:
    uri = "synth://nut?frames=4&defect_rate=1&seed=5&size=96"
    plain, relabelled = list(open_source(uri)), list(open_source(uri + "&variant=relabelled"))
    assert [f.label for f in relabelled] == [f.label for f in plain]
    assert {f.label for f in relabelled} <= set(synth.defect_types("nut"))
    assert all(not np.array_equal(a.image, b.image) for a, b in zip(plain, relabelled, strict=True))


def test_synth_variant_switch_counts_frames_as_yielded_when_looping() -> None:
    uri = "synth://weave?frames=2&defect_rate=0&size=64&variant=recoloured&variant_from=3"
    with open_source(uri, loop=True) as source:
        frames = list(islice(source, 5))
    assert np.array_equal(frames[2].image, frames[0].image), "frame 2 replays frame 0, before the switch"
    assert _differ(frames[3].image, frames[1].image) >= 20, "frame 3 replays frame 1 in the new variant"
    assert _differ(frames[4].image, frames[0].image) >= 20


# --------------------------------------------------------------------------------------------
# Image folders and globs
# --------------------------------------------------------------------------------------------


def test_folder_yields_file_bytes_sorted_undecoded(tmp_path: Path) -> None:
    files = _write_images(tmp_path / "station3")
    frames = list(open_source(str(tmp_path / "station3")))
    assert [f.name for f in frames] == ["a.png", "b.png", "c.jpg", "d_broken.png"]
    assert [f.index for f in frames] == [0, 1, 2, 3]
    for frame in frames:
        assert frame.camera == "station3" and frame.image is None and frame.label is None
        assert frame.encoded == files[frame.name]


def test_folder_loop_replays(tmp_path: Path) -> None:
    _write_images(tmp_path / "images")
    frames = list(islice(open_source(str(tmp_path / "images"), loop=True), 10))
    assert [f.name for f in frames[4:8]] == [f.name for f in frames[:4]]
    assert [f.index for f in frames] == list(range(10))


def test_glob_and_single_image(tmp_path: Path) -> None:
    files = _write_images(tmp_path / "images")
    frames = list(open_source(str(tmp_path / "images" / "*.png")))
    assert [f.name for f in frames] == ["a.png", "b.png", "d_broken.png"]
    assert frames[0].camera == "images" and frames[0].encoded == files["a.png"]
    (single,) = open_source(str(tmp_path / "images" / "c.jpg"))
    assert single.encoded == files["c.jpg"] and single.camera == "c"


def test_empty_or_missing_paths_fail_at_open(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(SourceError, match="no image files"):
        open_source(str(tmp_path / "empty"))
    with pytest.raises(SourceError, match="no file matches"):
        open_source(str(tmp_path / "empty" / "*.png"))
    with pytest.raises(SourceError, match="no such file or folder"):
        open_source(str(tmp_path / "missing"))
    not_a_video = tmp_path / "notes.txt"
    not_a_video.write_text("hello")
    with pytest.raises(SourceError, match="cannot be opened as a video"):
        open_source(str(not_a_video))
    assert issubclass(SourceError, GladError)


# --------------------------------------------------------------------------------------------
# Video files and live cameras
# --------------------------------------------------------------------------------------------


def test_video_file_yields_rgb_frames_then_ends(tmp_path: Path) -> None:
    video = _write_video(tmp_path / "belt.avi")
    frames = list(open_source(str(video)))
    assert [f.index for f in frames] == list(range(10))
    for index, frame in enumerate(frames):
        assert frame.camera == "belt" and frame.encoded is None
        assert frame.image.shape == (48, 64, 3) and frame.image.dtype == np.uint8
        red, green, blue = frame.image.reshape(-1, 3).mean(axis=0)
        assert abs(red - 200) < 10 and abs(blue - 20) < 10 and abs(green - 20 * index) < 10


def test_video_file_loop_replays(tmp_path: Path) -> None:
    video = _write_video(tmp_path / "belt.avi")
    with open_source(str(video), loop=True) as source:
        frames = list(islice(source, 25))
    assert [f.index for f in frames] == list(range(25))
    assert np.array_equal(frames[10].image, frames[0].image)


def test_live_source_reconnects_when_the_camera_returns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    video = _write_video(tmp_path / "cam.avi")
    away = tmp_path / "unplugged.avi"
    source = VideoSource(str(video), live=True, reconnect=FAST, camera="cam")
    frames: list[SourceFrame] = []
    consumer = threading.Thread(target=lambda: frames.extend(source), daemon=True)

    def unreachable() -> bool:
        return any("cannot open" in r.getMessage() for r in caplog.records)

    with caplog.at_level(logging.WARNING, logger="stages.sources"):
        consumer.start()
        _wait_until(lambda: len(frames) > 12)  # past the end of the file: a live source reconnects
        video.rename(away)
        _wait_until(unreachable)
        gone = len(frames)
        time.sleep(0.3)
        assert len(frames) == gone
        away.rename(video)
        _wait_until(lambda: len(frames) >= gone + 15)
        source.close()
        consumer.join(timeout=5)
    assert not consumer.is_alive()
    assert [f.index for f in frames] == list(range(len(frames)))
    warnings = [r for r in caplog.records if r.name == "stages.sources"]
    assert warnings and all(r.levelno == logging.WARNING and r.exc_info is None for r in warnings)
    assert all("camera cam" in r.getMessage() for r in warnings)


@pytest.mark.parametrize("uri", ["rtsp://127.0.0.1:1/line", "/nonexistent/missing.avi"])
def test_live_source_gives_up_after_max_attempts(uri: str, caplog: pytest.LogCaptureFixture) -> None:
    reconnect = Backoff(initial=0.01, max_attempts=2)
    source = open_source(uri, reconnect=reconnect) if "://" in uri else VideoSource(
        uri, live=True, reconnect=reconnect, camera="missing"
    )
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="stages.sources"), pytest.raises(
        SourceError, match=r"cannot open camera .* after 2 attempts"
    ):
        next(iter(source))
    assert time.monotonic() - start < 5
    assert len([r for r in caplog.records if r.name == "stages.sources"]) == 1


def test_close_from_another_thread_stops_a_retrying_source() -> None:
    source = open_source("rtsp://127.0.0.1:1/line", reconnect=Backoff(initial=30))
    threading.Timer(0.1, source.close).start()
    start = time.monotonic()
    assert list(source) == []
    assert time.monotonic() - start < 5


# --------------------------------------------------------------------------------------------
# Pacing
# --------------------------------------------------------------------------------------------


def test_paced_limits_the_rate() -> None:
    frames = list(islice(open_source("synth://nut?size=64"), 5))
    start = time.monotonic()
    assert list(paced(frames, 50)) == frames
    assert time.monotonic() - start >= 0.075
    start = time.monotonic()
    assert list(paced(frames, None)) == list(paced(frames, 0)) == frames
    assert time.monotonic() - start < 0.05


def test_paced_does_not_burst_after_a_stall() -> None:
    frame = SourceFrame("x", 0, image=np.zeros((1, 1, 3), np.uint8), encoded=None)

    def stalling() -> Iterator[SourceFrame]:
        yield frame
        time.sleep(0.2)  # a slow camera: the schedule restarts instead of catching up
        yield from [frame] * 4

    times = [time.monotonic() for _ in paced(stalling(), 20)]
    gaps = np.diff(times)
    assert gaps[0] >= 0.19 and (gaps[1:] >= 0.045).all()


def test_source_frame_has_exactly_one_payload() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        SourceFrame("x", 0, image=None, encoded=None)
    with pytest.raises(ValueError, match="exactly one"):
        SourceFrame("x", 0, image=np.zeros((1, 1, 3), np.uint8), encoded=b"x")
