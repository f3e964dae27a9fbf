"""Dataset readers: MVTec AD layout (train/good, test/*, ground_truth/*) and plain image folders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from glad.errors import DatasetError, ImageError
from glad.images import IMAGE_SUFFIXES, list_images

# MVTec AD textures (spec §8.1) and the texture of `glad synth`: not aligned, margin ROI.
TEXTURE_CATEGORIES = frozenset({"carpet", "grid", "leather", "tile", "wood", "weave"})


@dataclass(frozen=True)
class TestItem:
    """One test image: its label (0 good, 1 defective), defect type and mask file (if any)."""

    path: Path
    label: int
    defect: str
    mask_path: Path | None


@dataclass(frozen=True)
class MVTecCategory:
    """One category folder in MVTec AD layout."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def is_texture(self) -> bool:
        return self.name in TEXTURE_CATEGORIES

    def train_paths(self) -> list[Path]:
        return image_folder(self.root / "train" / "good")

    def test_items(self) -> list[TestItem]:
        test_root = self.root / "test"
        if not test_root.is_dir():
            raise DatasetError(f"{test_root}: missing test folder")
        items = []
        for folder in sorted(p for p in test_root.iterdir() if p.is_dir()):
            label = 0 if folder.name == "good" else 1
            for path in list_images(folder):
                mask = None
                if label:
                    mask = self.root / "ground_truth" / folder.name / f"{path.stem}_mask.png"
                    mask = mask if mask.is_file() else None
                items.append(TestItem(path, label, folder.name, mask))
        if not items:
            raise DatasetError(f"{test_root}: no test images")
        return items


def image_folder(folder: str | Path) -> list[Path]:
    """The images of a plain folder; `DatasetError` if it is missing or holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such folder")
    paths = list_images(folder)
    if not paths:
        raise DatasetError(
            f"{folder}: no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    return paths


def find_categories(root: str | Path, names: list[str] | None = None) -> list[MVTecCategory]:
    """Category folders under `root` (each with train/good), optionally restricted to `names`."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset folder")
    if (root / "train" / "good").is_dir():
        found = [MVTecCategory(root)]
    else:
        found = [MVTecCategory(p) for p in sorted(root.iterdir()) if (p / "train" / "good").is_dir()]
    if names:
        by_name = {c.name: c for c in found}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise DatasetError(f"{root}: unknown categories {', '.join(unknown)}; "
                               f"found {', '.join(by_name) or 'none'}")
        found = [by_name[n] for n in names]
    if not found:
        raise DatasetError(f"{root}: no category folders in MVTec layout (<category>/train/good)")
    return found


def read_mask(path: Path | None, shape: tuple[int, int]) -> np.ndarray:
    """Ground-truth mask as bool (H, W) of `shape`; all False when there is none."""
    if path is None:
        return np.zeros(shape, dtype=bool)
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ImageError(f"{path}: unreadable mask")
    if mask.shape != shape:
        mask = cv2.resize(mask, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return mask > 127
