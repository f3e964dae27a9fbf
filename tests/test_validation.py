"""Validation from normal images alone: threshold calibration to a false-alarm rate, canary
AUROC and recall, and canaries pasted inside the inspected region."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from glad.validation import (
    MIN_TAIL_SCORES,
    calibrate_threshold,
    format_selection,
    make_canaries,
    most_separating,
    selection_row,
    shifted_calibration,
    validate,
)


def test_few_scores_get_the_student_t_prediction_bound() -> None:
    scores = np.array([400.0, 402.0, 398.0, 410.0, 395.0, 405.0])
    calibration = calibrate_threshold(scores, far=0.005)
    bound = stats.t.ppf(0.995, 5) * scores.std(ddof=1) * math.sqrt(1 + 1 / 6)
    assert calibration.method == "student-t" and calibration.n_scores == 6
    assert calibration.threshold == pytest.approx(scores.mean() + bound)
    assert calibration.threshold > scores.max()


@pytest.mark.parametrize("distribution", [stats.expon(), stats.norm(), stats.gumbel_r()])
def test_tail_model_reaches_the_asked_false_alarm_rate_on_average(distribution) -> None:
    """Over many samples of 30 and 60 scores, the false-alarm rate the thresholds give lies near
    the one asked for, and never far below the light normal tail's (conservative there)."""
    rng = np.random.default_rng(0)
    for n in (30, 60):
        rates = [distribution.sf(calibrate_threshold(distribution.rvs(n, random_state=rng),
                                                     far=0.005).threshold) for _ in range(300)]
        assert np.mean(rates) < 0.012, (n, np.mean(rates))
        assert calibrate_threshold(distribution.rvs(n, random_state=rng)).method == "gpd"
    assert np.mean(rates) > 0.0002


def test_calibration_is_monotone_and_ignores_non_finite_scores() -> None:
    scores = np.random.default_rng(1).exponential(size=MIN_TAIL_SCORES + 20)
    loose, strict = calibrate_threshold(scores, 0.05), calibrate_threshold(scores, 0.001)
    assert strict.threshold > loose.threshold > np.median(scores)
    with_nan = calibrate_threshold(np.r_[scores, np.nan, np.inf], 0.05)
    assert with_nan.threshold == loose.threshold and with_nan.n_scores == len(scores)
    with pytest.raises(ValueError, match="at least 2"):
        calibrate_threshold([1.0, np.nan])
    with pytest.raises(ValueError, match="false-alarm rate"):
        calibrate_threshold(scores, 0.0)


def test_online_versions_keep_the_rate_at_the_gate_threshold() -> None:
    calibration = calibrate_threshold(np.arange(30.0))
    moved = shifted_calibration(calibration, calibration.threshold + 3)
    assert moved.far == calibration.far and moved.threshold == calibration.threshold + 3
    assert "gate" in moved.method and shifted_calibration(None, 1.0) is None


def test_validate_counts_auroc_recall_and_the_normal_tail() -> None:
    normal = [1.0, 2.0, 3.0, 4.0]
    canary = [3.5, 5.0, 6.0, np.nan]  # a canary no model could score counts as least anomalous
    result = validate(normal, canary, threshold=4.5)
    pairs = [(c > n) + 0.5 * (c == n) for c in (3.5, 5.0, 6.0, -np.inf) for n in normal]
    assert result.canary_auroc == pytest.approx(np.mean(pairs))
    assert result.recall == 0.5 and result.n_canaries == 4 and result.n_normals == 4
    assert result.normal_median == 2.5 and result.normal_max == 4.0
    assert result.normal_spread == pytest.approx(1.4826 * 1.0)
    assert result.separation == pytest.approx((result.canary_median - 2.5) / result.normal_spread)
    no_canaries = validate(normal, [])
    assert no_canaries.canary_auroc is None and no_canaries.recall is None
    assert no_canaries.separation == -math.inf


def test_auroc_error_follows_hanley_mcneil() -> None:
    """Few held-back images make the canary AUROC uncertain: 8 + 8 at 0.97 carry about 0.05,
    which is why model selection treats candidates that close as tied; more images, less."""
    few = validate(np.arange(8.0), np.r_[6.5, np.arange(9.0, 16.0)])  # one pair of 64 swapped
    assert few.canary_auroc == pytest.approx(63 / 64)
    assert 0.01 < few.auroc_error < 0.05
    many = validate(np.arange(80.0), np.r_[78.5, np.arange(81.0, 160.0)])
    assert many.canary_auroc > few.canary_auroc and many.auroc_error < few.auroc_error / 5
    assert validate([1.0, 2.0], [3.0, 4.0]).auroc_error == 0.0  # perfect separation
    assert validate([1.0], []).auroc_error is None


def test_most_separating_breaks_auroc_ties_by_the_canary_margin() -> None:
    """The rule behind radius and backbone selection: the best canary AUROC wins unless others
    lie within its standard error (then the widest canary margin in normal spreads wins);
    candidates without canaries never win over validated ones."""
    normal = np.arange(20.0)
    clear = validate(normal, normal + 40.0)  # AUROC 1, margin 40 / spread
    wider = validate(normal / 4, normal / 4 + 40.0)  # AUROC 1, four times the margin
    overlapping = validate(normal, np.r_[normal[:10] + 5.0, normal[10:] + 200.0])  # lower AUROC
    assert clear.canary_auroc == wider.canary_auroc == 1.0 > overlapping.canary_auroc
    assert wider.separation > clear.separation
    assert most_separating({"a": clear, "b": wider, "c": overlapping}, tie=0.005) == "b"
    assert most_separating({"a": clear, "c": overlapping}, tie=0.005) == "a"
    assert overlapping.separation > clear.separation  # the margin alone would have picked c
    assert most_separating({"a": clear, "c": overlapping}, tie=0.5) == "c"  # tied: margin decides
    assert most_separating({"a": clear, "none": validate(normal, [])}, tie=0.005) == "a"
    with pytest.raises(ValueError, match="canaries"):
        most_separating({"none": validate(normal, [])}, tie=0.005)
    table = format_selection({"backbone x": selection_row(wider, None, True),
                              "r=1": selection_row(clear, 9.5, False)})
    assert "<- chosen" in table.splitlines()[1] and "-" in table.splitlines()[1].split()
    assert "canary margin" in table.splitlines()[0]


def test_canaries_change_only_the_region_and_repeat_with_the_seed() -> None:
    rng = np.random.default_rng(2)
    images = [rng.integers(60, 200, size=(96, 96, 3), dtype=np.uint8) for _ in range(3)]
    region = np.zeros((96, 96), bool)
    region[20:80, 30:90] = True
    empty = np.zeros((96, 96), bool)
    canaries, used = make_canaries(images, [region, region, empty], seed=5)
    assert len(canaries) == 2 and used == [0, 1]  # nothing can be pasted in an empty region
    for image, canary in zip(images, canaries, strict=False):
        changed = (image != canary).any(-1)
        assert changed.any() and not changed[~region].any()
    again, _ = make_canaries(images, [region, region, empty], seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(canaries, again, strict=True))
    other, _ = make_canaries(images, [region, region, empty], seed=6)
    assert not np.array_equal(canaries[0], other[0])
    _, skipped_first = make_canaries(images, [empty, region, region], seed=5)
    assert skipped_first == [1, 2]  # the indices say which images the canaries belong to
