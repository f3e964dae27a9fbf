"""Tests of the synthetic MVTec-style dataset generator (glad.synth)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from glad import synth

TINY = synth.PRESETS["tiny"]
DEFECTS = [
    (category, defect) for category in synth.CATEGORIES for defect in synth.defect_types(category)
]
OBJECTS = [name for name, kind in synth.CATEGORIES.items() if kind == "object"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    folders = synth.generate_dataset(root, config=TINY, seed=0)
    assert folders == [root / name for name in synth.CATEGORIES]
    return root


def _pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png"))


def _read(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return image


def _part(normal: np.ndarray) -> np.ndarray:
    """Pixels of a normal object image that clearly differ from its border (background) colour."""
    border = np.concatenate([normal[0], normal[-1], normal[:, 0], normal[:, -1]])
    distance = np.abs(normal.astype(np.float32) - np.median(border, axis=0)).max(axis=2)
    return distance > 30


def test_categories_presets_and_defect_types() -> None:
    assert {
        "nut": "object",
        "pcb": "object",
        "weave": "texture",
    }.items() <= synth.CATEGORIES.items()
    assert synth.PRESETS["small"] == synth.SynthConfig()
    for category in synth.CATEGORIES:
        assert 3 <= len(synth.defect_types(category)) <= 5


def test_layout_has_the_configured_counts(tiny_root: Path) -> None:
    for category in synth.CATEGORIES:
        root = tiny_root / category
        assert len(_pngs(root / "train" / "good")) == TINY.n_train
        assert len(_pngs(root / "test" / "good")) == TINY.n_test_good
        test_folders = {p.name for p in (root / "test").iterdir()}
        assert test_folders == {"good", *synth.defect_types(category)}
        assert {p.name for p in (root / "ground_truth").iterdir()} == set(
            synth.defect_types(category)
        )
        for defect in synth.defect_types(category):
            images = _pngs(root / "test" / defect)
            masks = _pngs(root / "ground_truth" / defect)
            assert len(images) == TINY.n_test_defect
            assert masks == [name.replace(".png", "_mask.png") for name in images]


def test_written_images_are_rgb_256(tiny_root: Path) -> None:
    paths = sorted(tiny_root.glob("*/t*/*/*.png"))
    assert len(paths) > 50
    for path in paths:
        image = _read(path)
        assert image.dtype == np.uint8 and image.shape == (256, 256, 3), path


def test_written_masks_match_their_images(tiny_root: Path) -> None:
    masks = sorted(tiny_root.glob("*/ground_truth/*/*_mask.png"))
    assert (
        len(masks) == sum(len(synth.defect_types(c)) for c in synth.CATEGORIES) * TINY.n_test_defect
    )
    for mask_path in masks:
        category, _, defect = mask_path.parts[-4:-1]
        image = _read(tiny_root / category / "test" / defect / mask_path.name.replace("_mask", ""))
        mask = _read(mask_path)
        assert mask.shape == image.shape[:2], mask_path
        assert set(np.unique(mask)) <= {0, 255}, mask_path
        assert 0.003 <= (mask == 255).mean() <= 0.05, mask_path


@pytest.mark.parametrize(("category", "defect"), DEFECTS)
def test_add_defect_changes_exactly_the_masked_pixels(category: str, defect: str) -> None:
    normal = synth.render_normal(category, np.random.default_rng(5))
    before = normal.copy()
    image, mask = synth.add_defect(normal, category, defect, np.random.default_rng(6))
    assert np.array_equal(normal, before), "add_defect must not modify its input"
    assert image.dtype == np.uint8 and image.shape == normal.shape
    assert mask.dtype == bool and mask.shape == normal.shape[:2]
    change = np.abs(image.astype(np.int16) - normal.astype(np.int16)).max(axis=2)
    assert mask.any()
    assert change[mask].min() >= synth.CHANGE_THRESHOLD
    assert change[~mask].max() < synth.CHANGE_THRESHOLD
    assert change[mask].mean() >= 30, "defect should be clearly visible"


@pytest.mark.parametrize("category", OBJECTS)
def test_object_defects_lie_on_the_part(category: str) -> None:
    for seed in range(4):
        rng = np.random.default_rng(seed)
        normal = synth.render_normal(category, rng)
        part = cv2.dilate(_part(normal).astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        for defect in synth.defect_types(category):
            _, mask = synth.add_defect(normal, category, defect, rng)
            on_part = (mask & part).sum() / mask.sum()
            assert on_part >= 0.95, (category, defect, seed, on_part)


@pytest.mark.parametrize("category", OBJECTS)
def test_objects_are_centred_and_vary(category: str) -> None:
    images = [synth.render_normal(category, np.random.default_rng(seed)) for seed in range(3)]
    for image in images:
        ys, xs = np.nonzero(_part(image))
        assert abs(xs.mean() - 127.5) < 10 and abs(ys.mean() - 127.5) < 10
    assert not np.array_equal(images[0], images[1])


def test_render_normal_shape_dtype_and_rng_determinism() -> None:
    for category in synth.CATEGORIES:
        image = synth.render_normal(category, np.random.default_rng(1), size=128)
        assert image.dtype == np.uint8 and image.shape == (128, 128, 3)
        again = synth.render_normal(category, np.random.default_rng(1), size=128)
        other = synth.render_normal(category, np.random.default_rng(2), size=128)
        assert np.array_equal(image, again)
        assert not np.array_equal(image, other)


def test_same_seed_gives_identical_bytes(tiny_root: Path, tmp_path: Path) -> None:
    synth.generate_dataset(tmp_path, config=TINY, seed=0)
    first = sorted(p.relative_to(tiny_root) for p in tiny_root.rglob("*.png"))
    second = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.png"))
    assert first == second
    for relative in first:
        assert (tiny_root / relative).read_bytes() == (tmp_path / relative).read_bytes(), relative


def test_other_seed_gives_other_images(tiny_root: Path, tmp_path: Path) -> None:
    synth.generate_dataset(tmp_path, ["nut"], config=TINY, seed=1)
    images = sorted(p.relative_to(tmp_path) for p in tmp_path.glob("nut/t*/*/*.png"))
    assert len(images) > 20
    for relative in images:
        assert (tiny_root / relative).read_bytes() != (tmp_path / relative).read_bytes(), relative


def test_unknown_names_raise_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bolt"):
        synth.generate_dataset(tmp_path, ["nut", "bolt"], config=TINY)
    assert list(tmp_path.iterdir()) == [], "nothing may be written for a bad request"
    with pytest.raises(ValueError):
        synth.render_normal("bolt", np.random.default_rng(0))
    with pytest.raises(ValueError):
        synth.add_defect(
            np.zeros((256, 256, 3), np.uint8), "weave", "missing", np.random.default_rng(0)
        )


def test_progress_bar_and_other_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = synth.SynthConfig(size=96, n_train=1, n_test_good=1, n_test_defect=1)
    synth.generate_dataset(tmp_path, ["weave"], config=config, progress=True)
    assert "synth" in capsys.readouterr().err
    image = _read(tmp_path / "weave" / "test" / "hole" / "000.png")
    mask = _read(tmp_path / "weave" / "ground_truth" / "hole" / "000_mask.png")
    assert image.shape == (96, 96, 3) and mask.shape == (96, 96)


# sha256 over render_normal and add_defect outputs (see _digest), computed with glad/synth.py as it was
# before product variants and canary defects were added. Benchmarks and stored datasets rely on these
# images staying the same. Recorded with OpenCV 5.0, which pyproject.toml pins: 5.1 rasterises
# anti-aliased lines differently (nut and pcb change, up to 150 grey levels along edges).
RENDER_DIGESTS = {
    "nut": "dd7affb10a73733747329d35db207c7a3009963390ccd867411a822199d48732",
    "pcb": "449df023af0791c4531b681b1dafc57a617c68d0f45621e649dacb18cb17524d",
    "weave": "5a58e6f4a18a1fadf2f871c3d698eb1767180818be601359a2dca134f56f164d",
}


def _digest(category: str) -> str:
    """Hash of three normal images (two sizes) and every defect type drawn on each."""
    digest = hashlib.sha256()
    for seed, size in [(0, 256), (1, 256), (2, 96)]:
        rng = np.random.default_rng(seed)
        image = synth.render_normal(category, rng, size)
        digest.update(image.tobytes())
        for defect in synth.defect_types(category):
            damaged, mask = synth.add_defect(image, category, defect, rng)
            digest.update(damaged.tobytes())
            digest.update(mask.tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("category", list(RENDER_DIGESTS))
def test_images_of_a_fixed_seed_are_unchanged(category: str) -> None:
    assert _digest(category) == RENDER_DIGESTS[category]
