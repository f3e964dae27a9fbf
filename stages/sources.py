"""Where the capture stage gets its frames: synthetic cameras, image folders, videos and live cameras.

`open_source(uri)` turns one URI into an iterable of `SourceFrame`s, so the capture stage does not care
whether frames come from a file on disk or a camera on the line:

- `synth://nut?defect_rate=0.1&seed=0&size=256&frames=0`: a built-in inspection camera over
  `glad.synth` with occasional defects and ground-truth labels, reproducible frame by frame;
  `&variant=recoloured&variant_from=500` switches to another product variant from frame 500 on;
- an image folder or a glob pattern: the files' bytes, undecoded, so that a corrupt file is caught
  (and dead-lettered with its reason) downstream instead of stopping the source;
- a video file: decoded frames until the end of the file;
- `rtsp(s)://` and `http(s)://` streams and USB cameras (`0`, `/dev/video0`): decoded frames; a camera
  that cannot be opened or drops out is reopened with exponential backoff, so the line resumes when
  the camera comes back.

Sources are closeable, also from another thread (the iteration then stops promptly), and usable as
context managers. `paced` limits the frame rate of any source.
"""

from __future__ import annotations

import glob
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self
from urllib.parse import parse_qsl, urlsplit

import cv2
import numpy as np

from glad import synth
from glad.errors import GladError
from glad.images import IMAGE_SUFFIXES, list_images
from pipeline.connection import Backoff

log = logging.getLogger(__name__)
# how a live source retries opens and reads (None attempts: forever)
SOURCE_BACKOFF = Backoff(initial=0.5, maximum=10.0)

LIVE_SCHEMES = ("rtsp", "rtsps", "http", "https")
SYNTH_PARAMETERS: dict[str, type] = {
    "defect_rate": float,
    "seed": int,
    "size": int,
    "frames": int,
    "variant": str,
    "variant_from": int,
}


class SourceError(GladError):
    """A frame source that cannot be opened: missing path, empty folder, bad URI, camera gone for good."""


@dataclass
class SourceFrame:
    """One frame from a source; exactly one of `image` and `encoded` is set."""

    camera: str  # camera id: given, or from the source (e.g. "synth", "cam0", video file stem, folder)
    index: int  # 0, 1, 2, ... per iteration of a source; keeps counting across loops and reconnects
    image: np.ndarray | None  # RGB uint8 (H, W, 3), for decoded sources (synth, video, camera)
    encoded: bytes | None  # the file's bytes as-is, for image files: decoded (and checked) downstream
    name: str | None = None  # file name, for image files
    label: str | None = None  # ground truth when known: "normal" or the defect type (synth only)

    def __post_init__(self) -> None:
        if (self.image is None) == (self.encoded is None):
            raise ValueError("a SourceFrame has exactly one of image and encoded")


class FrameSource(Protocol):
    """An iterable of `SourceFrame`s that can be closed, also as a context manager."""

    def __iter__(self) -> Iterator[SourceFrame]: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None: ...


class _Source:
    """Closing and the context manager, shared by the sources: `close` sets `_closed`."""

    def __init__(self, camera: str) -> None:
        self.camera = camera
        self._closed = threading.Event()

    def close(self) -> None:
        """Stop the iteration (promptly, also from another thread) and release what is held."""
        self._closed.set()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


class SynthSource(_Source):
    """A synthetic inspection camera: normal `category` parts, each a defect with `defect_rate`.

    Frame k is drawn by its own generator seeded from (seed, k), so frames are reproducible one by one.
    `frames` = 0 is endless; otherwise the source ends after `frames` frames, or replays them if `loop`.
    From frame `variant_from` on (default 0), parts are of product `variant` (see `glad.synth.VARIANTS`),
    as when a new supplier's parts arrive: still labelled "normal", and defects are drawn on them as
    before. The switch counts frames as yielded, so replays of a looped source after it show the variant.
    """

    def __init__(
        self,
        category: str = "nut",
        *,
        defect_rate: float = 0.1,
        seed: int = 0,
        size: int = 256,
        frames: int = 0,
        loop: bool = False,
        camera: str = "synth",
        variant: str | None = None,
        variant_from: int | None = None,
    ) -> None:
        super().__init__(camera)
        try:
            self.defects = synth.defect_types(category)
        except ValueError as error:
            raise SourceError(f"synth source: {error}") from None
        if not 0.0 <= defect_rate <= 1.0:
            raise SourceError(f"synth source: defect_rate {defect_rate} is not in [0, 1]")
        if size < synth.MIN_SIZE:
            raise SourceError(f"synth source: size {size} is too small, at least {synth.MIN_SIZE} px")
        if frames < 0:
            raise SourceError(f"synth source: frames {frames} is negative")
        _check_variant(category, variant, variant_from)
        self.category, self.defect_rate, self.seed = category, defect_rate, seed
        self.size, self.frames, self.loop = size, frames, loop
        self.variant, self.variant_from = variant, variant_from or 0

    def render(self, index: int) -> tuple[np.ndarray, str]:
        """Frame `index`, counted as yielded, and its label ("normal" or the defect type)."""
        shot = index % self.frames if self.frames else index  # which frame a looped source replays
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, shot]))
        defect = self.defects[rng.integers(len(self.defects))] if rng.random() < self.defect_rate else None
        variant = self.variant if index >= self.variant_from else None
        image = synth.render_normal(self.category, rng, self.size, variant)
        if defect is None:
            return image, "normal"
        return synth.add_defect(image, self.category, defect, rng)[0], defect

    def __iter__(self) -> Iterator[SourceFrame]:
        index = 0
        while not self._closed.is_set() and (self.loop or not self.frames or index < self.frames):
            image, label = self.render(index)
            yield SourceFrame(self.camera, index, image=image, encoded=None, label=label)
            index += 1


class ImageFilesSource(_Source):
    """The bytes of a fixed, sorted list of image files, once or (`loop`) over and over."""

    def __init__(self, paths: list[Path], *, loop: bool = False, camera: str) -> None:
        super().__init__(camera)
        self.paths, self.loop = paths, loop

    def __iter__(self) -> Iterator[SourceFrame]:
        index = 0
        while not self._closed.is_set():
            pass_start = index
            for path in self.paths:
                if self._closed.is_set():
                    return
                try:
                    data = path.read_bytes()
                except OSError as error:  # removed or unreadable since it was listed: skip, keep going
                    log.warning("camera %s: skipping %s: %s", self.camera, path, error.strerror or error)
                    continue
                yield SourceFrame(self.camera, index, image=None, encoded=data, name=path.name)
                index += 1
            if not self.loop:
                return
            if index == pass_start:
                raise SourceError(f"camera {self.camera}: none of its {len(self.paths)} files can be read")


class VideoSource(_Source):
    """Decoded frames from `cv2.VideoCapture`: a video file, a stream URL or a camera index.

    Not `live` (a file): the source ends at the end of the file, or reopens it there when `loop`.
    `live` (a camera): the end of the stream or a failed read means the camera dropped out; it is
    released and reopened per `reconnect`, as is a camera that cannot be opened at start, one warning
    line per failure. `Backoff.max_attempts` consecutive failures raise a `SourceError`.
    """

    def __init__(
        self,
        target: str | int,
        *,
        live: bool,
        loop: bool = False,
        reconnect: Backoff | None = None,
        camera: str,
    ) -> None:
        super().__init__(camera)
        self.target, self.live, self.loop = target, live, loop
        self.reconnect = reconnect or SOURCE_BACKOFF
        self._lock = threading.Lock()  # guards the capture: close() may come from another thread
        self._capture: cv2.VideoCapture | None = None
        if not live:  # a file that cannot be read fails now, not at the first frame
            self._capture = self._open()
            if self._capture is None:
                raise SourceError(f"{target}: cannot be opened as a video")

    def close(self) -> None:
        super().close()
        self._release()

    def __iter__(self) -> Iterator[SourceFrame]:
        index, failures, pass_start = 0, 0, 0
        try:
            while not self._closed.is_set():
                with self._lock:
                    if self._closed.is_set():
                        return
                    if self._capture is None:
                        self._capture = self._open()
                    opened = self._capture is not None
                    ok, bgr = self._capture.read() if opened else (False, None)
                if ok:
                    failures = 0
                    yield SourceFrame(self.camera, index, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), encoded=None)
                    index += 1
                    continue
                self._release()
                if self.live:
                    failures += 1
                    if not self._wait_to_retry(failures, opened):
                        return
                    continue
                if not opened:
                    raise SourceError(f"{self.target}: cannot be opened as a video")
                if index == pass_start:
                    raise SourceError(f"{self.target}: no frame could be decoded")
                if not self.loop:
                    return
                pass_start = index
        finally:
            self._release()

    def _open(self) -> cv2.VideoCapture | None:
        """A new capture of the target, or None if it cannot be opened."""
        capture = cv2.VideoCapture(self.target)
        if capture.isOpened():
            return capture
        capture.release()
        return None

    def _release(self) -> None:
        with self._lock:
            if self._capture is not None:
                self._capture.release()
                self._capture = None

    def _wait_to_retry(self, failures: int, opened: bool) -> bool:
        """Log the failure and wait out the backoff; False if the source was closed meanwhile."""
        limit = self.reconnect.max_attempts
        if limit is not None and failures >= limit:
            raise SourceError(f"cannot open camera {self.camera} ({self.target}) after {failures} attempts")
        delay = self.reconnect.delay(failures)
        what = "stream ended or read failed" if opened else "cannot open"
        log.warning("camera %s (%s): %s; retrying in %.2f s", self.camera, self.target, what, delay)
        return not self._closed.wait(delay)


def open_source(
    uri: str, *, loop: bool = False, camera: str | None = None, reconnect: Backoff | None = None
) -> FrameSource:
    """The frame source for `uri` (see the module docstring); `camera` overrides the camera id.

    `loop` replays finite sources (folders, globs, video files, synth with `frames`); `reconnect` is
    the backoff of live sources. Raises `SourceError` for bad URIs and missing or empty paths; a live
    camera that cannot be opened is retried while iterating instead.
    """
    scheme = urlsplit(uri).scheme.lower()
    if scheme == "synth":
        return _synth_source(uri, loop, camera or "synth")
    if scheme in LIVE_SCHEMES or uri.isdigit() or uri.startswith("/dev/video"):
        target: str | int = int(uri) if uri.isdigit() else uri
        name = camera or (f"cam{uri}" if uri.isdigit() else _live_name(uri))
        return VideoSource(target, live=True, reconnect=reconnect, camera=name)
    if glob.has_magic(uri):
        paths = sorted(Path(p) for p in glob.glob(uri, recursive=True) if Path(p).is_file())
        if not paths:
            raise SourceError(f"{uri}: no file matches this pattern")
        return ImageFilesSource(paths, loop=loop, camera=camera or _glob_name(uri))
    path = Path(uri)
    if path.is_dir():
        paths = [p for p in list_images(path) if p.is_file()]
        if not paths:
            raise SourceError(f"{path}: no image files in this folder ({', '.join(IMAGE_SUFFIXES)})")
        return ImageFilesSource(paths, loop=loop, camera=camera or path.resolve().name)
    if not path.is_file():
        raise SourceError(f"{path}: no such file or folder")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return ImageFilesSource([path], loop=loop, camera=camera or path.stem)
    return VideoSource(str(path), live=False, loop=loop, reconnect=reconnect, camera=camera or path.stem)


def paced(frames: Iterable[SourceFrame], fps: float | None) -> Iterator[SourceFrame]:
    """Yield `frames` at most `fps` per second on a steady schedule; None or 0 is as fast as possible.

    Frames are due at fixed intervals from the first, so sleeping does not accumulate drift; when
    the source falls behind (a slow camera, a reconnect), the schedule restarts rather than bursting.
    """
    if not fps:
        yield from frames
        return
    period = 1.0 / fps
    due = time.monotonic()
    for frame in frames:
        now = time.monotonic()
        if now < due:
            time.sleep(due - now)
        else:
            due = now
        yield frame
        due += period


def _synth_source(uri: str, loop: bool, camera: str) -> SynthSource:
    parts = urlsplit(uri)
    options: dict[str, float | str] = {}
    for key, text in parse_qsl(parts.query, keep_blank_values=True):
        parse = SYNTH_PARAMETERS.get(key)
        if parse is None:
            raise SourceError(f"{uri}: unknown parameter {key!r}; expected one of {sorted(SYNTH_PARAMETERS)}")
        try:
            options[key] = parse(text)
        except ValueError:
            raise SourceError(f"{uri}: {key}={text!r} is not a valid {parse.__name__}") from None
    return SynthSource(parts.netloc or "nut", loop=loop, camera=camera, **options)


def _check_variant(category: str, variant: str | None, variant_from: int | None) -> None:
    """Raise `SourceError` unless `variant` is one of the category's and `variant_from` a frame index."""
    if variant is None:
        if variant_from is not None:
            raise SourceError("synth source: variant_from is given but no variant to switch to")
        return
    known = synth.variants(category)
    if variant not in known:
        raise SourceError(
            f"synth source: unknown variant {variant!r} for {category!r}; expected one of {list(known)}"
        )
    if variant_from is not None and variant_from < 0:
        raise SourceError(f"synth source: variant_from {variant_from} is negative")


def _live_name(uri: str) -> str:
    """A camera id for a stream URL or device path: its host or device name."""
    parts = urlsplit(uri)
    return parts.hostname or Path(parts.path).name or uri


def _glob_name(pattern: str) -> str:
    """A camera id for a glob: the name of the last folder before the first wildcard."""
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    return Path(*parts[:fixed]).resolve().name if fixed else Path.cwd().name
