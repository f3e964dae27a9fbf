"""Reading and validating images: everything downstream sees RGB uint8 arrays of shape (H, W, 3)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from glad.errors import ImageError

MIN_SIDE = 32
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 (H, W, 3); raise `ImageError` on anything unusable."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise ImageError(f"{path}: empty file")
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageError(f"{path}: not a readable image (corrupt, truncated or unknown format)")
    if _looks_truncated(data, path.suffix.lower()):
        raise ImageError(f"{path}: image file is truncated")
    try:
        return as_rgb(image, assume_bgr=True)
    except ImageError as error:
        raise ImageError(f"{path}: {error}") from None


def decode_image(data: bytes) -> np.ndarray:
    """Decode encoded image bytes (PNG/JPEG/...) to RGB uint8; raise `ImageError` if unusable."""
    buffer = np.frombuffer(data, dtype=np.uint8)
    image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED) if buffer.size else None
    if image is None:
        raise ImageError("bytes are not a readable image (corrupt, truncated or unknown format)")
    if _looks_truncated(buffer):
        raise ImageError("image bytes are truncated")
    return as_rgb(image, assume_bgr=True)


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
