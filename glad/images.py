"""Reading and validating images: everything downstream sees RGB uint8 arrays of shape (H, W, 3)."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from glad.errors import ImageError

LINE_JPEG_QUALITY = 95  # the capture stage's JPEG frames; models' default noise floor covers it
MIN_SIDE = 32
# Images declaring more pixels than this are refused before decoding: a 2.6 MB PNG can declare
# 30000 x 30000 and would take 2.7 GB once decoded (a decompression bomb).
MAX_PIXELS = 50_000_000
MAX_PIXELS_ENV = "GLAD_MAX_PIXELS"  # overrides MAX_PIXELS (`glad --max-pixels` sets it for workers)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless...; not DHT C4, JPG C8, DAC CC)
JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def pixel_limit() -> int:
    """The largest image accepted, in pixels: $GLAD_MAX_PIXELS, else MAX_PIXELS."""
    text = os.environ.get(MAX_PIXELS_ENV)
    if text is None:
        return MAX_PIXELS
    if not (text.isascii() and text.isdigit()) or int(text) < MIN_SIDE * MIN_SIDE:
        raise ImageError(f"{MAX_PIXELS_ENV}={text!r}: expected a pixel count of at least "
                         f"{MIN_SIDE * MIN_SIDE}")
    return int(text)


def read_image(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as RGB uint8 (H, W, 3); raise `ImageError` on anything unusable
    (including more than `max_pixels` pixels, default `pixel_limit()`)."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise ImageError(f"{path}: empty file")
    try:
        return _decode(data, max_pixels, path.suffix.lower())
    except ImageError as error:
        raise ImageError(f"{path}: {error}") from None


def decode_image(data: bytes, max_pixels: int | None = None) -> np.ndarray:
    """Decode encoded image bytes (PNG/JPEG/...) to RGB uint8; raise `ImageError` if unusable."""
    buffer = np.frombuffer(data, dtype=np.uint8)
    if not buffer.size:
        raise ImageError("bytes are not a readable image (empty)")
    return _decode(buffer, max_pixels)


def _decode(buffer: np.ndarray, max_pixels: int | None, suffix: str = "") -> np.ndarray:
    """The checks shared by files and bytes: declared size first, then decoding and the end;
    `max_pixels` None: `pixel_limit()`."""
    max_pixels = pixel_limit() if max_pixels is None else max_pixels
    size = declared_size(buffer)
    if size is not None and size[0] * size[1] > max_pixels:
        raise ImageError(f"image declares {size[0]}x{size[1]} pixels, more than the limit of "
                         f"{max_pixels / 1e6:g} Mpx (a decompression bomb?)")
    try:
        image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    except cv2.error as error:  # e.g. a header OpenCV's own limits refuse
        raise ImageError(f"not a decodable image ({str(error).strip().splitlines()[-1]})") from None
    if image is None:
        raise ImageError("not a readable image (corrupt, truncated or unknown format)")
    if _looks_truncated(buffer, suffix):
        raise ImageError("image is truncated")
    if image.shape[0] * image.shape[1] > max_pixels:
        raise ImageError(f"image is {image.shape[1]}x{image.shape[0]} pixels, more than the limit "
                         f"of {max_pixels / 1e6:g} Mpx")
    return as_rgb(image, assume_bgr=True)


def declared_size(data: np.ndarray | bytes) -> tuple[int, int] | None:
    """(width, height) a PNG, JPEG or BMP header declares, read without decoding; None for
    other formats or a header too short to say."""
    head = bytes(data[:65536])
    if head.startswith(PNG_SIGNATURE) and len(head) >= 24 and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if head.startswith(b"BM") and len(head) >= 26:
        return (abs(int.from_bytes(head[18:22], "little", signed=True)),
                abs(int.from_bytes(head[22:26], "little", signed=True)))
    if head.startswith(b"\xff\xd8"):
        return _jpeg_size(head)
    return None


def _jpeg_size(head: bytes) -> tuple[int, int] | None:
    """Walk the JPEG segments to the first start-of-frame and read its size."""
    at = 2
    while at + 9 <= len(head):
        if head[at] != 0xFF:
            return None
        marker = head[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # segments without a length
            at += 2
            continue
        length = int.from_bytes(head[at + 2 : at + 4], "big")
        if marker in JPEG_FRAMES:
            return int.from_bytes(head[at + 7 : at + 9], "big"), int.from_bytes(
                head[at + 5 : at + 7], "big")
        at += 2 + length
    return None


def as_rgb(image: np.ndarray, assume_bgr: bool = False) -> np.ndarray:
    """Convert a grayscale, RGB(A) or 16-bit array to RGB uint8 (H, W, 3), checking its size."""
    image = np.asarray(image)
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype in (np.float32, np.float64):
        if not np.isfinite(image).all():
            raise ImageError("image has NaN or infinite pixels")
        image = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageError(f"unsupported pixel type {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] in (3, 4):
        image = image[:, :, :3]
        if assume_bgr:
            image = image[:, :, ::-1]
    else:
        raise ImageError(f"unsupported image shape {image.shape}: expected HxW, HxWx3 or HxWx4")
    height, width = image.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise ImageError(f"image is {width}x{height}: both sides must be at least {MIN_SIDE} px")
    return np.ascontiguousarray(image)


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to size x size (no crop), area interpolation when shrinking, as spec §1.3."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    shrinking = image.shape[0] >= size and image.shape[1] >= size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _looks_truncated(data: np.ndarray, suffix: str = "") -> bool:
    """OpenCV decodes truncated PNG/JPEG files partially without complaint; check the end markers."""
    tail = data[-12:].tobytes()
    if suffix == ".png" or data[:8].tobytes() == b"\x89PNG\r\n\x1a\n":
        return b"IEND" not in tail
    if suffix in (".jpg", ".jpeg") or data[:2].tobytes() == b"\xff\xd8":
        return b"\xff\xd9" not in data[-64:].tobytes()
    return False


def jpeg_round_trip(image: np.ndarray, quality: int) -> np.ndarray:
    """An RGB uint8 image after JPEG encoding at `quality` (1-100) and decoding."""
    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(image[:, :, ::-1]),
                            [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"JPEG encoding failed for an image of shape {image.shape}")
    return cv2.imdecode(data, cv2.IMREAD_COLOR)[:, :, ::-1].copy()
