"""Heat-map overlays people can look at: the frame, a colour map of the anomaly, the alarm contour."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from glad.images import resize_square


def overlay(image: np.ndarray, heatmap: np.ndarray, threshold: float, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 picture: `image` resized to the heat map, JET colours, contour where h > threshold.

    Colours run from the image's median anomaly (transparent-looking blue) to max(threshold, peak),
    so a normal part stays cool and only regions near or above the alarm level turn red.
    """
    size = heatmap.shape[0]
    base = resize_square(image, size)
    low = float(np.median(heatmap))
    high = max(float(threshold), float(heatmap.max()), low + 1e-6)
    scaled = np.clip((heatmap - low) / (high - low), 0.0, 1.0)
    colours = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)[:, :, ::-1]
    picture = cv2.addWeighted(base, 1.0 - alpha, colours, alpha, 0.0)
    alarm = (heatmap > threshold).astype(np.uint8)
    contours, _ = cv2.findContours(alarm, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(picture, contours, -1, (255, 255, 255), 1)
    return picture


def save_overlay(path: str | Path, image: np.ndarray, heatmap: np.ndarray, threshold: float) -> Path:
    """Write `overlay(...)` as PNG next to the original image, side by side."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = overlay(image, heatmap, threshold)
    side = np.concatenate([resize_square(image, heatmap.shape[0]), picture], axis=1)
    if not cv2.imwrite(str(path), side[:, :, ::-1]):
        raise OSError(f"cannot write {path}")
    return path
