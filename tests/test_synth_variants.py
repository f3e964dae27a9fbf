"""Tests of product variants and canary defects in glad.synth: real rendered images, no mocks."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from glad import synth

OBJECTS = [name for name, kind in synth.CATEGORIES.items() if kind == "object"]
VARIANT_CASES = [(category, variant) for category in synth.CATEGORIES for variant in synth.variants(category)]


def _pair(category: str, variant: str, seed: int, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The same part (same generator state) in its old look and in `variant`."""
    normal = synth.render_normal(category, np.random.default_rng(seed), size)
    return normal, synth.render_normal(category, np.random.default_rng(seed), size, variant)


def _delta(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Largest change over the channels, per pixel."""
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=2)


def _part_hull(normal: np.ndarray) -> np.ndarray:
    """The convex hull of the pixels clearly unlike the border colour: the whole part, bore included."""
    border = np.concatenate([normal[0], normal[-1], normal[:, 0], normal[:, -1]])
    part = np.abs(normal.astype(np.float32) - np.median(border, axis=0)).max(axis=2) > 30
    hull = cv2.convexHull(np.argwhere(part)[:, ::-1].astype(np.int32))
    return cv2.fillConvexPoly(np.zeros(part.shape, np.uint8), hull, 1).astype(bool)


def _grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    return cv2.dilate(mask.astype(np.uint8), np.ones((2 * pixels + 1,) * 2, np.uint8)).astype(bool)


def _shrink(mask: np.ndarray, pixels: int) -> np.ndarray:
    return cv2.erode(mask.astype(np.uint8), np.ones((2 * pixels + 1,) * 2, np.uint8)).astype(bool)


def _gradient(height: int, width: int) -> np.ndarray:
    """A smooth colour gradient: nothing like the synthetic categories."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    return np.stack([255 * x / width, 255 * y / height, 128 + 0 * x], axis=2).astype(np.uint8)


def _noise_photo(height: int, width: int) -> np.ndarray:
    """A 'photo' of a mottled surface: blurred colour noise around mid grey."""
    noise = np.random.default_rng(42).normal(128, 60, (height, width, 3)).astype(np.float32)
    return np.clip(cv2.GaussianBlur(noise, (0, 0), 2.0), 0, 255).astype(np.uint8)


PHOTOS = {
    "gradient": _gradient(192, 256),
    "noise": _noise_photo(200, 300),
    "wide": _noise_photo(180, 320),  # 16:9
    "blue_pcb": synth.render_normal("pcb", np.random.default_rng(3), variant="recoloured"),
}


# --------------------------------------------------------------------------------------------
# Product variants
# --------------------------------------------------------------------------------------------


def test_variants_are_listed_and_documented() -> None:
    assert {"recoloured", "relabelled"} <= set(synth.VARIANTS)
    assert all(len(text) > 40 for text in synth.VARIANTS.values()), "say what each variant is for"
    assert synth.variants("nut") == synth.variants("pcb") == ("recoloured", "relabelled")
    assert synth.variants("weave") == ("recoloured",)
    for category in synth.CATEGORIES:
        assert set(synth.variants(category)) <= set(synth.VARIANTS)


@pytest.mark.parametrize(("category", "variant", "message"), [
    ("nut", "gold", "unknown variant 'gold'"),
    ("weave", "relabelled", "unknown variant 'relabelled'"),
    ("bolt", "recoloured", "unknown category"),
])  # fmt: skip
def test_unknown_variants_raise_value_error(category: str, variant: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        synth.render_normal(category, np.random.default_rng(0), variant=variant)


@pytest.mark.parametrize(("category", "variant"), VARIANT_CASES)
def test_variants_are_deterministic_and_use_no_random_numbers(category: str, variant: str) -> None:
    first, second = np.random.default_rng(7), np.random.default_rng(7)
    image = synth.render_normal(category, first, 128, variant)
    again = synth.render_normal(category, second, 128, variant)
    assert np.array_equal(image, again)
    plain = np.random.default_rng(7)
    synth.render_normal(category, plain, 128)
    assert first.random() == plain.random(), "a variant must leave the generator where the old look does"
    other = synth.render_normal(category, np.random.default_rng(8), 128, variant)
    assert not np.array_equal(image, other), "variant parts still vary from part to part"


@pytest.mark.parametrize("category", OBJECTS)
def test_recoloured_objects_change_the_whole_part_and_nothing_else(category: str) -> None:
    for seed in range(3):
        normal, recoloured = _pair(category, "recoloured", seed)
        delta = _delta(normal, recoloured)
        hull = _part_hull(normal)
        inside, outside = _shrink(hull, 4), ~_grow(hull, 3)
        assert delta[inside].mean() >= 40, "a large shift: clearly another colour"
        assert (delta[inside] >= synth.CHANGE_THRESHOLD).mean() >= 0.85, "consistent over the part"
        assert delta[outside].max() == 0, "the background, shadow included, is untouched"
        luminance = np.corrcoef(normal.mean(axis=2)[inside], recoloured.mean(axis=2)[inside])[0, 1]
        assert luminance > 0.95, "shading and surface texture are kept"


def test_recoloured_weave_changes_the_whole_cloth_keeping_its_texture() -> None:
    for seed in range(3):
        normal, recoloured = _pair("weave", "recoloured", seed)
        delta = _delta(normal, recoloured)
        assert delta.mean() >= 25
        assert (delta >= synth.CHANGE_THRESHOLD).mean() >= 0.9
        assert np.corrcoef(normal.mean(axis=2).ravel(), recoloured.mean(axis=2).ravel())[0, 1] > 0.95


@pytest.mark.parametrize("category", OBJECTS)
def test_relabelled_objects_carry_a_small_mark_at_a_fixed_place_on_the_part(category: str) -> None:
    offsets, areas = [], []
    for seed in range(4):
        normal, relabelled = _pair(category, "relabelled", seed)
        mark = _delta(normal, relabelled) >= synth.CHANGE_THRESHOLD
        hull = _part_hull(normal)
        assert 0.001 <= mark.mean() <= 0.02, "a small marking, not a new look"
        assert not (mark & ~hull).any(), "printed on the part"
        ys, xs = np.nonzero(mark)
        part_ys, part_xs = np.nonzero(hull)
        offsets.append((xs.mean() - part_xs.mean(), ys.mean() - part_ys.mean()))
        areas.append(mark.sum())
    spread = np.ptp(np.array(offsets), axis=0)
    assert spread.max() <= 10, f"the mark moves with the part, not on its own: {offsets}"
    assert max(areas) <= 1.3 * min(areas)


@pytest.mark.parametrize(("category", "variant"), VARIANT_CASES)
def test_defects_draw_on_variant_parts(category: str, variant: str) -> None:
    rng = np.random.default_rng(11)
    image = synth.render_normal(category, rng, variant=variant)
    for defect in synth.defect_types(category):
        damaged, mask = synth.add_defect(image, category, defect, rng)
        change = _delta(image, damaged)
        assert synth.MASK_FRACTION[0] <= mask.mean() <= synth.MASK_FRACTION[1], defect
        assert change[mask].min() >= synth.CHANGE_THRESHOLD and change[~mask].max() < synth.CHANGE_THRESHOLD
        assert change[mask].mean() >= 25, (defect, "visible (a brown stain on beige cloth is fainter)")


# --------------------------------------------------------------------------------------------
# Canary defects
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PHOTOS))
def test_paste_defect_changes_exactly_the_mask_inside_the_region(name: str) -> None:
    photo = PHOTOS[name]
    before = photo.copy()
    height, width = photo.shape[:2]
    region = np.zeros((height, width), bool)
    region[height // 4 : 3 * height // 4, width // 5 : 4 * width // 5] = True
    for seed in range(6):
        image, mask = synth.paste_defect(photo, region, np.random.default_rng(seed))
        assert np.array_equal(photo, before), "paste_defect must not modify its input"
        assert image.dtype == np.uint8 and image.shape == photo.shape
        assert mask.dtype == bool and mask.shape == (height, width)
        assert synth.MASK_FRACTION[0] <= mask.mean() <= synth.MASK_FRACTION[1], (name, seed, mask.mean())
        assert not (mask & ~region).any(), "only inside the region"
        assert np.array_equal(image[~mask], photo[~mask]), "bit-identical outside the mask"
        change = _delta(photo, image)
        assert change[mask].min() >= synth.CHANGE_THRESHOLD
        assert change[mask].mean() >= 30, (name, seed, "clearly visible")


def test_paste_defect_without_a_region_keeps_a_margin() -> None:
    photo = PHOTOS["wide"]
    margin = round(0.03 * min(photo.shape[:2]))
    for seed in range(6):
        _, mask = synth.paste_defect(photo, None, np.random.default_rng(seed))
        assert mask.any()
        assert not mask[:margin].any() and not mask[-margin:].any()
        assert not mask[:, :margin].any() and not mask[:, -margin:].any()


def test_paste_defect_is_deterministic_per_seed() -> None:
    photo = PHOTOS["noise"]
    first = synth.paste_defect(photo, None, np.random.default_rng(3))
    again = synth.paste_defect(photo, None, np.random.default_rng(3))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    masks = [synth.paste_defect(photo, None, np.random.default_rng(seed))[1] for seed in range(4, 8)]
    assert all(not np.array_equal(first[1], mask) for mask in masks)


@pytest.mark.parametrize("kind", range(len(synth._CANARIES)))
def test_each_canary_kind_is_a_localized_visible_change_on_a_photo(kind: int) -> None:
    """Every perturbation `paste_defect` picks from works on its own on a non-synthetic image."""
    photo = PHOTOS["noise"]
    region = np.zeros(photo.shape[:2], bool)
    region[40:160, 60:240] = True
    sized = 0
    for seed in range(8):
        drawn = synth._CANARIES[kind](photo.astype(np.float32), region, np.random.default_rng(seed))
        change = _delta(photo, np.clip(np.rint(drawn), 0, 255).astype(np.uint8))
        assert (change[~region] == 0).all(), "nothing outside the region moves, not even a little"
        mask = change >= synth.CHANGE_THRESHOLD
        sized += synth.MASK_FRACTION[0] <= mask.mean() <= synth.MASK_FRACTION[1]
    assert sized >= 6, f"kind {kind}: only {sized} of 8 draws had a plausible size"


@pytest.mark.parametrize(("region", "message"), [
    (np.zeros((200, 300), bool), "region is empty"),
    (np.ones((300, 200), bool), "does not match"),
])  # fmt: skip
def test_paste_defect_rejects_bad_regions(region: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        synth.paste_defect(PHOTOS["noise"], region, np.random.default_rng(0))


def test_paste_defect_rejects_images_that_are_not_rgb_uint8() -> None:
    photo = PHOTOS["noise"]
    for bad in (photo.astype(np.float32), photo[:, :, 0], photo[:, :, :2]):
        with pytest.raises(ValueError, match="RGB uint8"):
            synth.paste_defect(bad, None, np.random.default_rng(0))


def test_a_missing_chip_on_a_blue_board_shows_blue_solder_mask() -> None:
    """The hole left by a missing package is filled with the board's own colour, whatever the variant."""
    rng = np.random.default_rng(4)
    image = synth.render_normal("pcb", rng, variant="recoloured")
    damaged, mask = synth.add_defect(image, "pcb", "missing", rng)
    pixels = image.reshape(-1, 3).astype(np.float32)
    board = np.median(pixels[pixels[:, 2] > pixels[:, 0] + 40], axis=0)  # the bulk of the blue pixels
    fill = damaged[mask].astype(np.float32).mean(axis=0)
    assert np.abs(fill - board).max() < 12, (fill, board)
