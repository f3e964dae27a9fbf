"""Evaluation metrics of spec §8.2: image AUROC, pixel AUROC and AU-PRO, all exact.

Ties are handled the usual way: a tied (positive, negative) pair counts 1/2, and the ROC / PRO
curve goes in a straight line between the operating points of consecutive distinct scores, which
is what `sklearn.metrics.roc_auc_score` and the MVTec AD evaluation code compute.

The pixel metrics never sort (score, label) pairs. They sort the defect-free pixels' scores once
(a plain value sort, which is fast) and look the defect pixels up in them with binary search, so the
memory is one copy of the scores and the time is dominated by that sort. Neither metric resizes:
masks and heat maps must already be in the same frame (spec §8.2 says to state which one).
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy.stats import rankdata


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of image scores; labels are 1/True for anomalous, 0/False for good.

    Computed as the Mann-Whitney U statistic from average ranks, so tied scores count 1/2.
    Raises `ValueError` when the inputs disagree in length, scores contain NaN, labels are not
    binary, or only one class is present (the AUROC is then undefined).
    """
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.size} labels but {scores.size} scores")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0/1 or boolean")
    positive = labels.astype(bool)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        present = "anomalous" if n_pos else "good"
        raise ValueError(f"AUROC needs good and anomalous images; only {present} ones were given")
    rank_sum = rankdata(scores)[positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pixel_auroc(masks: np.ndarray, heatmaps: np.ndarray) -> float:
    """ROC AUC over all pixels of all images pooled (good images included), exact with ties.

    masks: bool (B, H, W), True on defect pixels; heatmaps: (B, H, W), higher = more anomalous.
    Memory: one copy of the scores (in their own dtype), split into defect-free and defect pixels.
    """
    negatives, positives = _split_pixels(masks, heatmaps)
    positives.sort()
    weights = np.full(positives.size, 1.0 / positives.size)
    return _partial_auc(negatives, positives, weights, fpr_limit=1.0)


def au_pro(masks: np.ndarray, heatmaps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve for FPR in [0, fpr_limit], divided by fpr_limit.

    Regions are the 8-connected components of each image's mask (the MVTec AD convention). At a
    threshold t, PRO(t) is the mean over all regions of the fraction of the region's pixels with
    score >= t, and FPR(t) is the fraction of defect-free pixels with score >= t. The curve is
    exact: every distinct score is a threshold (no binning), with linear interpolation between
    consecutive thresholds and at fpr_limit, as in the MVTec AD evaluation code.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    negatives, positives = _split_pixels(masks, heatmaps)
    weights = _region_weights(np.asarray(masks))
    order = np.argsort(positives)
    area = _partial_auc(negatives, positives[order], weights[order], fpr_limit)
    return area / fpr_limit


def _split_pixels(masks: np.ndarray, heatmaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores of the defect-free pixels (sorted ascending) and of the defect pixels (mask order)."""
    masks = np.asarray(masks)
    heatmaps = np.asarray(heatmaps)
    if masks.ndim != 3 or masks.shape != heatmaps.shape:
        raise ValueError(
            f"masks and heatmaps must both be (B, H, W) of one shape, got {masks.shape} and "
            f"{heatmaps.shape}"
        )
    if masks.dtype != bool:
        raise ValueError(f"masks must be boolean (e.g. ground truth > 127), got {masks.dtype}")
    if np.isnan(heatmaps).any():
        raise ValueError("heatmaps contain NaN")
    n_pos = int(np.count_nonzero(masks))
    if n_pos == 0 or n_pos == masks.size:
        present = "defect" if n_pos else "defect-free"
        raise ValueError(f"pixel metrics need defect and defect-free pixels; only {present} ones")
    negatives = np.empty(masks.size - n_pos, dtype=heatmaps.dtype)
    positives = np.empty(n_pos, dtype=heatmaps.dtype)
    neg_at = pos_at = 0
    for mask, heatmap in zip(masks, heatmaps, strict=True):  # per image: no full-size temporaries
        k = int(np.count_nonzero(mask))
        positives[pos_at : pos_at + k] = heatmap[mask]
        negatives[neg_at : neg_at + mask.size - k] = heatmap[~mask]
        pos_at += k
        neg_at += mask.size - k
    negatives.sort()
    return negatives, positives


def _region_weights(masks: np.ndarray) -> np.ndarray:
    """Per defect pixel (mask order): 1 / (size of its region x number of regions), for PRO."""
    per_image = []
    n_regions = 0
    for mask in masks:
        count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        region = labels[mask]  # labels 1..count-1; 0 is the background
        per_image.append(1.0 / np.bincount(region, minlength=count)[region])
        n_regions += count - 1
    return np.concatenate(per_image) / n_regions


def _partial_auc(
    negatives: np.ndarray, positives: np.ndarray, weights: np.ndarray, fpr_limit: float
) -> float:
    """Area under (FPR, weighted TPR) for FPR in [0, fpr_limit]; thresholds at every distinct score.

    negatives: sorted ascending; positives: any order; weights: per positive, summing to 1, so the
    weighted TPR at threshold t is the weight of the positives with score >= t. Swapping the sums
    over thresholds and positives, each positive p contributes weight(p) times the FPR mass below
    it inside the integration range, with its own tie group counted half (the linear segment):

        m  = fpr_limit * n_neg            negatives the range covers, counted from the top
        v* = the ceil(m)-th highest negative, c = #neg == v*, a = m - #neg > v*   (0 < a <= c)
        p > v*:  (#neg < p  - #neg <= v*  + a  + #neg == p / 2) / n_neg
        p = v*:  a^2 / (2 c n_neg)        (the range ends inside v*'s segment)
        p < v*:  0
    """
    n_neg = negatives.size
    m = fpr_limit * n_neg
    v_star = negatives[n_neg - int(np.ceil(m))]
    below_star = np.searchsorted(negatives, v_star, "left")
    upto_star = np.searchsorted(negatives, v_star, "right")
    c = upto_star - below_star
    a = m - (n_neg - upto_star)
    below = np.searchsorted(negatives, positives, "left")
    upto = np.searchsorted(negatives, positives, "right")
    above_part = below - upto_star + a + 0.5 * (upto - below)
    mass = np.where(positives > v_star, above_part, 0.0)
    mass = np.where(positives == v_star, a * a / (2.0 * c), mass)
    return float(np.dot(weights, mass) / n_neg)
