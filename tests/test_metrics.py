"""Metrics against hand-computed cases and against brute-force references on random data."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from glad.metrics import au_pro, image_auroc, pixel_auroc


def _pairwise_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Brute force: fraction of (positive, negative) pairs ordered right, ties counting 1/2."""
    pos, neg = scores[labels], scores[~labels]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def _brute_force_au_pro(masks: np.ndarray, heatmaps: np.ndarray, fpr_limit: float) -> float:
    """Threshold at every distinct score, scipy.ndimage regions, trapezoid cut at fpr_limit."""
    structure = np.ones((3, 3), dtype=bool)
    regions = []
    for mask, heatmap in zip(masks, heatmaps, strict=True):
        labels, count = ndimage.label(mask, structure=structure)
        regions += [heatmap[labels == j] for j in range(1, count + 1)]
    thresholds = np.unique(heatmaps)[::-1, None]  # every distinct score, highest first
    fprs = np.append(0.0, np.mean(heatmaps[~masks] >= thresholds, axis=1))
    pros = np.append(0.0, np.mean([np.mean(r >= thresholds, axis=1) for r in regions], axis=0))
    inside = fprs <= fpr_limit
    x = np.append(fprs[inside], fpr_limit)
    y = np.append(pros[inside], np.interp(fpr_limit, fprs, pros))
    return float(np.trapezoid(y, x) / fpr_limit)


# --- image AUROC -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "scores", "expected"),
    [
        ([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], 1.0),
        ([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1], 0.0),
        ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75),
        ([0, 1], [2.0, 2.0], 0.5),
        ([0, 0, 1], [1.0, 2.0, 2.0], 0.75),
        ([False, True, True], [5.0, 5.0, 5.0], 0.5),
    ],
)
def test_image_auroc_hand_cases(labels, scores, expected):
    assert image_auroc(labels, scores) == pytest.approx(expected, abs=1e-12)


def test_image_auroc_matches_pairwise_count_with_many_ties():
    rng = np.random.default_rng(0)
    labels = rng.random(300) < 0.3
    scores = rng.integers(0, 12, 300).astype(np.float64)  # lots of ties
    assert image_auroc(labels, scores) == pytest.approx(_pairwise_auc(labels, scores), abs=1e-12)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1]])
def test_image_auroc_one_class_raises(labels):
    with pytest.raises(ValueError, match="needs good and anomalous"):
        image_auroc(labels, np.arange(len(labels), dtype=float))


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [([0, 1], [0.1], "labels but"), ([0, 2], [0.1, 0.2], "0/1"), ([0, 1], [0.1, np.nan], "NaN")],
)
def test_image_auroc_rejects_bad_input(labels, scores, message):
    with pytest.raises(ValueError, match=message):
        image_auroc(labels, scores)


# --- pixel AUROC -------------------------------------------------------------------------------


def test_pixel_auroc_hand_case():
    masks = np.zeros((2, 2, 2), dtype=bool)
    masks[0, 0, 0] = True
    heatmaps = np.array([[[3, 1], [1, 0]], [[3, 2], [0, 0]]], dtype=np.float32)
    # The positive (3) beats 5 of 7 negatives and ties one (the other 3): (6 + 0.5) / 7.
    assert pixel_auroc(masks, heatmaps) == pytest.approx(6.5 / 7, abs=1e-12)


@pytest.mark.parametrize("levels", [None, 7])
def test_pixel_auroc_matches_pairwise_count(levels):
    rng = np.random.default_rng(1)
    masks = rng.random((4, 16, 16)) < 0.2
    heatmaps = rng.random((4, 16, 16)).astype(np.float32) + 0.3 * masks
    if levels:
        heatmaps = np.round(heatmaps * levels) / levels  # ties within and across classes
    expected = _pairwise_auc(masks.ravel(), heatmaps.ravel())
    assert pixel_auroc(masks, heatmaps) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_rejects_bad_input():
    heatmaps = np.zeros((1, 4, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="only defect-free"):
        pixel_auroc(np.zeros((1, 4, 4), dtype=bool), heatmaps)
    with pytest.raises(ValueError, match="boolean"):
        pixel_auroc(np.zeros((1, 4, 4), dtype=np.uint8), heatmaps)
    with pytest.raises(ValueError, match="one shape"):
        pixel_auroc(np.zeros((1, 4, 5), dtype=bool), heatmaps)


# --- AU-PRO ------------------------------------------------------------------------------------


def _two_regions() -> np.ndarray:
    masks = np.zeros((1, 8, 8), dtype=bool)
    masks[0, 1:3, 1:6] = True  # a 10-pixel region
    masks[0, 6, 6] = True  # a 1-pixel region
    return masks


def test_au_pro_perfect_constant_and_inverted_maps():
    masks = _two_regions()
    assert au_pro(masks, masks.astype(np.float32)) == pytest.approx(1.0)
    # A constant map jumps from (0, 0) to (1, 1): the line y = x, area 0.3^2 / 2, over 0.3.
    assert au_pro(masks, np.zeros(masks.shape, np.float32)) == pytest.approx(0.15)
    assert au_pro(masks, (~masks).astype(np.float32)) == pytest.approx(0.0)


def test_au_pro_averages_regions_not_pixels():
    masks = _two_regions()
    heatmaps = np.zeros(masks.shape, np.float32)
    heatmaps[0, 1:3, 1:6] = 1.0  # the large region is found, the small one missed
    # Curve (0, 0) -> (0, 0.5) -> (1, 1): integral of 0.5 + 0.5 x over [0, 0.3] is 0.1725.
    assert au_pro(masks, heatmaps) == pytest.approx(0.1725 / 0.3)


def test_au_pro_diagonal_neighbours_form_one_region():
    masks = np.zeros((1, 6, 6), dtype=bool)
    masks[0, 1, 1] = masks[0, 2, 2] = True  # 8-connected: one region of 2 pixels
    heatmaps = np.zeros(masks.shape, np.float32)
    heatmaps[0, 1, 1] = 1.0  # half the region found at FPR 0
    # Curve (0, 0) -> (0, 0.5) -> (1, 1) again.
    assert au_pro(masks, heatmaps) == pytest.approx(0.1725 / 0.3)


@pytest.mark.parametrize(("levels", "fpr_limit"), [(None, 0.3), (5, 0.3), (9, 0.05), (None, 1.0)])
def test_au_pro_matches_brute_force(levels, fpr_limit):
    rng = np.random.default_rng(2)
    masks = ndimage.binary_dilation(rng.random((5, 20, 20)) < 0.03, iterations=1)
    masks[1] = False  # a defect-free image
    heatmaps = (rng.random(masks.shape) + 0.5 * masks).astype(np.float32)
    heatmaps = ndimage.uniform_filter(heatmaps, size=(1, 3, 3))
    if levels:
        heatmaps = np.round(heatmaps * levels) / levels
    expected = _brute_force_au_pro(masks, heatmaps, fpr_limit)
    assert au_pro(masks, heatmaps, fpr_limit) == pytest.approx(expected, abs=1e-9)


def test_au_pro_fpr_limit_one_with_single_pixel_regions_is_pixel_auroc():
    rng = np.random.default_rng(3)
    masks = np.zeros((3, 10, 10), dtype=bool)
    masks[:, ::4, ::4] = True  # isolated pixels: every region weighs the same
    heatmaps = rng.random(masks.shape).astype(np.float32)
    assert au_pro(masks, heatmaps, 1.0) == pytest.approx(pixel_auroc(masks, heatmaps), abs=1e-12)


def test_au_pro_rejects_bad_limit():
    with pytest.raises(ValueError, match="fpr_limit"):
        au_pro(_two_regions(), np.zeros((1, 8, 8), np.float32), fpr_limit=0.0)
