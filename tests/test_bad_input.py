"""Unusable images and folders fail with the library's typed errors; odd-but-valid images work."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from glad.datasets import find_categories, image_folder
from glad.errors import DatasetError, GladError, ImageError
from glad.images import MAX_PIXELS, as_rgb, declared_size, decode_image, read_image


def gradient(height: int = 48, width: int = 40) -> np.ndarray:
    """An RGB uint8 image with distinct channels, so channel-order mistakes show."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 5) % 256, (y * 3) % 256, np.full_like(x, 200)], axis=2).astype(np.uint8)


def write_png(path: Path, rgb: np.ndarray) -> Path:
    bgr = rgb[:, :, ::-1] if rgb.ndim == 3 and rgb.shape[2] == 3 else rgb
    assert cv2.imwrite(str(path), bgr)
    return path


def test_valid_rgb_png_round_trips(tmp_path: Path) -> None:
    rgb = gradient()
    image = read_image(write_png(tmp_path / "ok.png", rgb))
    assert image.dtype == np.uint8 and image.shape == (48, 40, 3)
    np.testing.assert_array_equal(image, rgb)


def test_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.png"
    path.write_bytes(b"this is not an image at all" * 50)
    with pytest.raises(ImageError):
        read_image(path)


def test_png_header_then_garbage(tmp_path: Path) -> None:
    path = tmp_path / "garbage.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    with pytest.raises(ImageError):
        read_image(path)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, size=(96, 96, 3), dtype=np.uint8)
    whole = tmp_path / f"whole{suffix}"
    assert cv2.imwrite(str(whole), noisy)
    read_image(whole)  # the complete file is fine
    data = whole.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError):
        read_image(cut)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError):
        read_image(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageError):
        read_image(tmp_path)  # a folder is not an image file


def test_errors_are_glad_errors_with_one_line_messages(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(GladError) as info:
        read_image(path)
    message = str(info.value)
    assert message and "\n" not in message and "empty.png" in message


def test_grayscale_png_becomes_rgb(tmp_path: Path) -> None:
    gray = gradient()[:, :, 0]
    path = tmp_path / "gray.png"
    assert cv2.imwrite(str(path), gray)
    image = read_image(path)
    assert image.shape == (48, 40, 3) and image.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(image[:, :, channel], gray)


def test_rgba_png_drops_alpha_and_keeps_colour_order(tmp_path: Path) -> None:
    rgb = gradient()
    alpha = np.full(rgb.shape[:2], 77, dtype=np.uint8)
    bgra = np.dstack([rgb[:, :, ::-1], alpha])
    path = tmp_path / "rgba.png"
    assert cv2.imwrite(str(path), bgra)
    image = read_image(path)
    assert image.shape == (48, 40, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, rgb)


def test_sixteen_bit_png(tmp_path: Path) -> None:
    rgb16 = gradient().astype(np.uint16) * 257 + 3  # 16-bit values whose high byte is the 8-bit one
    path = tmp_path / "deep.png"
    assert cv2.imwrite(str(path), rgb16[:, :, ::-1])
    assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    image = read_image(path)
    assert image.shape == (48, 40, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, gradient())


def test_sixteen_bit_grayscale_png(tmp_path: Path) -> None:
    gray16 = (np.arange(48 * 40, dtype=np.uint16).reshape(48, 40) * 30).astype(np.uint16)
    path = tmp_path / "deep_gray.png"
    assert cv2.imwrite(str(path), gray16)
    image = read_image(path)
    assert image.shape == (48, 40, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[:, :, 1], (gray16 >> 8).astype(np.uint8))


@pytest.mark.parametrize("shape", [(10, 10, 3), (10, 100, 3), (100, 31)])
def test_too_small_image(tmp_path: Path, shape) -> None:
    path = tmp_path / "small.png"
    assert cv2.imwrite(str(path), np.full(shape, 128, dtype=np.uint8))
    with pytest.raises(ImageError):
        read_image(path)


def test_minimum_side_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "edge.png"
    assert cv2.imwrite(str(path), np.full((32, 32, 3), 9, dtype=np.uint8))
    assert read_image(path).shape == (32, 32, 3)


def test_decode_image_bytes() -> None:
    rgb = gradient()
    ok, buffer = cv2.imencode(".png", rgb[:, :, ::-1])
    assert ok
    np.testing.assert_array_equal(decode_image(buffer.tobytes()), rgb)
    with pytest.raises(ImageError):
        decode_image(b"")
    with pytest.raises(ImageError):
        decode_image(b"not an image")


def test_as_rgb_rejects_unusable_arrays() -> None:
    with pytest.raises(ImageError):
        as_rgb(np.zeros((64, 64, 2), dtype=np.uint8))
    with pytest.raises(ImageError):
        as_rgb(np.zeros((64, 64, 3), dtype=np.int64))
    with pytest.raises(ImageError):
        as_rgb(np.full((64, 64, 3), np.nan, dtype=np.float32))
    floats = as_rgb(np.full((64, 64), 1.0, dtype=np.float32))
    assert floats.shape == (64, 64, 3) and (floats == 255).all()


def test_image_folder_missing_and_empty(tmp_path: Path) -> None:
    with pytest.raises(DatasetError):
        image_folder(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError):
        image_folder(empty)


def test_image_folder_lists_images_sorted(tmp_path: Path) -> None:
    for name in ("b.png", "a.PNG", "c.jpg"):
        assert cv2.imwrite(str(tmp_path / name), gradient())
    (tmp_path / "readme.md").write_text("x")
    assert [p.name for p in image_folder(tmp_path)] == ["a.PNG", "b.png", "c.jpg"]


def test_find_categories_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError):
        find_categories(tmp_path / "missing")
    with pytest.raises(DatasetError):
        find_categories(tmp_path)  # exists but holds no <category>/train/good
    (tmp_path / "nut" / "train" / "good").mkdir(parents=True)
    assert [c.name for c in find_categories(tmp_path)] == ["nut"]
    with pytest.raises(DatasetError):
        find_categories(tmp_path, ["pcb"])


def declaring(size: tuple[int, int], suffix: str) -> bytes:
    """A small real PNG or JPEG whose header claims `size` (width, height): a decompression
    bomb's header without its gigabytes (the PNG's header checksum is recomputed)."""
    ok, buffer = cv2.imencode(suffix, gradient()[:, :, ::-1])
    data = bytearray(buffer.tobytes())
    width, height = size
    if suffix == ".png":
        data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
        data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    else:
        at = next(i for i in range(2, len(data) - 9) if data[i] == 0xFF and data[i + 1] == 0xC0)
        data[at + 5 : at + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path, suffix: str) -> None:
    """Issue 13, hole 3: a header declaring 30000 x 30000 is refused by its header, with a
    clear reason, whether it arrives as bytes or as a file."""
    bomb = declaring((30000, 30000), suffix)
    assert declared_size(bomb) == (30000, 30000)
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(bomb)
    path = tmp_path / f"bomb{suffix}"
    path.write_bytes(bomb)
    with pytest.raises(ImageError, match=f"{path.name}: .*more than the limit of 50 Mpx"):
        read_image(path)
    with pytest.raises(ImageError, match="limit of 0.001 Mpx"):
        decode_image(declaring((40, 48), suffix), max_pixels=1000)  # a smaller limit: refused
    assert MAX_PIXELS == 50_000_000


def test_header_opencv_refuses_is_an_image_error() -> None:
    """A header OpenCV's own checks reject raises cv2.error inside imdecode; it must surface as
    bad input (ImageError), not as an unexpected error a stage would retry."""
    huge = declaring((40000, 40000), ".png")
    with pytest.raises(ImageError):
        decode_image(huge, max_pixels=10**10)


def test_declared_sizes_of_the_common_formats() -> None:
    rgb = gradient(40, 60)
    for suffix in (".png", ".jpg", ".bmp"):
        assert declared_size(cv2.imencode(suffix, rgb)[1].tobytes()) == (60, 40), suffix
    progressive = cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1]
    assert declared_size(progressive.tobytes()) == (60, 40)
    assert declared_size(b"GIF89a....") is None and declared_size(b"\x89PNG") is None


def test_the_pixel_limit_comes_from_the_environment(tmp_path: Path, monkeypatch) -> None:
    """`glad --max-pixels N` sets $GLAD_MAX_PIXELS so that the workers `glad run` starts
    inherit it; every decoder reads it."""
    from glad.images import MAX_PIXELS_ENV, pixel_limit

    small = cv2.imencode(".png", gradient(100, 100))[1].tobytes()
    assert decode_image(small).shape[:2] == (100, 100)
    monkeypatch.setenv(MAX_PIXELS_ENV, "5000")
    assert pixel_limit() == 5000
    with pytest.raises(ImageError, match="limit of 0.005 Mpx"):
        decode_image(small)
    for bad in ("-1", "²", "lots", "10"):
        monkeypatch.setenv(MAX_PIXELS_ENV, bad)
        with pytest.raises(ImageError, match=MAX_PIXELS_ENV):
            pixel_limit()


def test_glad_max_pixels_flag(tmp_path: Path, capsys, monkeypatch) -> None:
    from app.cli import main
    from glad.images import MAX_PIXELS_ENV

    # main() sets the variable for the workers it starts; setenv first, so the test's teardown
    # restores the environment as it was (unset) whatever main() wrote
    monkeypatch.setenv(MAX_PIXELS_ENV, str(MAX_PIXELS))
    frame = tmp_path / "frame.png"
    frame.write_bytes(cv2.imencode(".png", gradient(100, 100))[1].tobytes())
    code = main(["--max-pixels", "5000", "score", str(tmp_path / "no-model"), str(frame)])
    assert code == 2 and os.environ[MAX_PIXELS_ENV] == "5000"
    assert main(["--max-pixels", "7", "score", str(tmp_path / "no-model"), str(frame)]) == 2
    assert "expected a pixel count" in capsys.readouterr().err
