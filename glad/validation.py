"""Validation from normal images alone: the one mechanism behind model selection at fit time,
threshold calibration and the online updater's gate.

Users have no defects to tune on, so every choice is judged on held-back normal images (scored
by a model that never trained on them) and on the same images with synthetic defects pasted on
(`canaries`: CutPaste-style patches, scratches and stains of several sizes and contrasts,
`glad.synth.paste_defect`). `validate` turns the two sets of scores into canary AUROC, recall at
a threshold and the tail of the normal scores; `calibrate_threshold` sets the alarm level for a
false-alarm rate from the normal scores' upper tail.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TypeVar

import numpy as np
from scipy import stats

from glad.metrics import image_auroc
from glad.synth import paste_defect

DEFAULT_FAR = 0.005  # false alarms per normal part that thresholds are calibrated to
# Generalised Pareto tail from this many normal scores on; fewer: a Student-t prediction bound.
MIN_TAIL_SCORES = 20
TAIL_SHARE = 0.5  # the tail model is fitted to the scores above this upper share's threshold
# The GPD shape xi is kept within [0, MAX_SHAPE]: an exponential tail or a heavier one. A few
# dozen scores cannot tell a bounded tail (xi < 0) from sampling noise, and trusting one put the
# threshold too low: over 400 simulated draws of 20-60 scores each (normal, exponential,
# lognormal, Gumbel, Student-t5), allowing xi down to -0.5 gave 0.010-0.020 false alarms for a
# 0.005 target, xi >= 0 gave 0.004-0.009 (0.0004-0.002 on the light normal tail).
MAX_SHAPE = 0.5
CANARY_SEED_OFFSET = 7919  # canaries draw from their own stream, not the model's seed itself

Key = TypeVar("Key")


@dataclass(frozen=True)
class Calibration:
    """An alarm level for a false-alarm rate, and how it was derived."""

    threshold: float
    far: float  # the rate asked for: the share of normal parts expected above the threshold
    method: str  # "gpd" (generalised Pareto tail) or "student-t" (small-sample bound)
    n_scores: int  # normal scores it was calibrated on

    def to_dict(self) -> dict:
        return asdict(self)


def calibrate_threshold(normal_scores: Sequence[float], far: float = DEFAULT_FAR) -> Calibration:
    """The score above which a normal part is expected with probability `far`.

    With MIN_TAIL_SCORES finite scores or more, peaks over threshold: a generalised Pareto
    distribution fitted (probability-weighted moments, shape within [0, MAX_SHAPE]) to the excesses
    over the scores' (1 - TAIL_SHARE) quantile, extrapolated to `far`. With fewer, the upper
    Student-t prediction bound of a normal sample of that size, which widens as the sample shrinks
    (with 4 scores it sits 6.5 standard deviations above their mean, with 19 about 3.1). The
    maximum of a few scores is no bound at all: with 6 of them it sits near the 86th percentile.
    """
    if not 0.0 < far < 1.0:
        raise ValueError(f"the false-alarm rate must lie in (0, 1), got {far}")
    scores = np.sort(np.asarray(normal_scores, dtype=np.float64))
    scores = scores[np.isfinite(scores)]
    if len(scores) < 2:
        raise ValueError(f"calibrating a threshold needs at least 2 finite normal scores, "
                         f"got {len(scores)}")
    if len(scores) >= MIN_TAIL_SCORES:
        return Calibration(_pareto_quantile(scores, far), far, "gpd", len(scores))
    n = len(scores)
    bound = stats.t.ppf(1.0 - far, n - 1) * scores.std(ddof=1) * math.sqrt(1.0 + 1.0 / n)
    return Calibration(float(scores.mean() + bound), far, "student-t", n)


def _pareto_quantile(sorted_scores: np.ndarray, far: float) -> float:
    """The 1 - far quantile from a GPD fitted to the excesses over the upper TAIL_SHARE."""
    n = len(sorted_scores)
    tail = max(2, int(round(TAIL_SHARE * n)))
    base = float(sorted_scores[n - tail - 1])
    excess = sorted_scores[n - tail :] - base
    share = tail / n  # P(score > base)
    # Hosking & Wallis (1987): a0 = E[X], a1 = E[X (1 - F(X))] from the ordered excesses.
    a0 = float(excess.mean())
    a1 = float(np.mean(excess * (tail - 1 - np.arange(tail)) / (tail - 1)))
    if a0 <= 0.0 or a0 - 2.0 * a1 <= 0.0:
        return float(sorted_scores[-1])  # no spread above the base: nothing to extrapolate
    shape = float(np.clip(2.0 - a0 / (a0 - 2.0 * a1), 0.0, MAX_SHAPE))  # xi
    scale = a0 * (1.0 - shape)  # sigma: the mean excess is sigma / (1 - xi)
    if far >= share:
        return float(np.quantile(sorted_scores, 1.0 - far))
    ratio = far / share
    if abs(shape) < 1e-6:
        return base - scale * math.log(ratio)
    return base + scale / shape * (ratio ** (-shape) - 1.0)


def shifted_calibration(calibration: Calibration | None, threshold: float) -> Calibration | None:
    """An online version's calibration: production's false-alarm rate, at the threshold the gate
    moved it to (None when production's threshold was never calibrated)."""
    if calibration is None:
        return None
    return replace(calibration, threshold=float(threshold),
                   method=f"{calibration.method}, shifted by the validation gate")


@dataclass(frozen=True)
class Validation:
    """How a model separates held-back normals from canaries, and its tail of normal scores."""

    canary_auroc: float | None  # None without canaries or normals
    recall: float | None  # canaries above `threshold` (None without one)
    threshold: float | None
    normal_median: float
    normal_spread: float  # 1.4826 MAD of the normal scores: a robust standard deviation
    normal_max: float
    canary_median: float | None
    n_normals: int
    n_canaries: int

    @property
    def separation(self) -> float:
        """How far the canaries' median sits above the normals', in normal spreads (a robust
        d'): among equally separable models, the one whose normal scores are tightest."""
        if self.canary_median is None or not self.normal_spread > 0:
            return -math.inf
        return (self.canary_median - self.normal_median) / self.normal_spread

    @property
    def auroc_error(self) -> float | None:
        """Standard error of the canary AUROC (Hanley & McNeil, 1982): with 8 normals and 8
        canaries at 0.97 it is 0.05, so candidates that close cannot be told apart."""
        if self.canary_auroc is None:
            return None
        a, n, m = self.canary_auroc, self.n_normals, self.n_canaries
        q1, q2 = a / (2.0 - a), 2.0 * a * a / (1.0 + a)
        variance = (a * (1.0 - a) + (m - 1) * (q1 - a * a) + (n - 1) * (q2 - a * a)) / (m * n)
        return math.sqrt(max(variance, 0.0))

    def to_dict(self) -> dict:
        return asdict(self) | {"separation": self.separation}


def validate(normal_scores: Sequence[float], canary_scores: Sequence[float],
             threshold: float | None = None) -> Validation:
    """Canary AUROC (canaries against normals; NaN scores count as the least anomalous, so a
    model that cannot score them gains nothing), recall at `threshold` and the normal tail."""
    normal = np.asarray(normal_scores, dtype=np.float64)
    canary = np.asarray(canary_scores, dtype=np.float64)
    if not len(normal):
        raise ValueError("validation needs held-back normal scores")
    finite = normal[np.isfinite(normal)]
    median = float(np.median(finite)) if len(finite) else math.nan
    spread = 1.4826 * float(np.median(np.abs(finite - median))) if len(finite) else math.nan
    auroc = None
    if len(canary):
        both = np.r_[normal, canary]
        both = np.where(np.isnan(both), -np.inf, both)
        auroc = image_auroc(np.r_[np.zeros(len(normal)), np.ones(len(canary))],
                            np.nan_to_num(both, posinf=np.finfo(np.float64).max,
                                          neginf=np.finfo(np.float64).min))
    recall = None if threshold is None or not len(canary) else float(
        np.mean(np.nan_to_num(canary, nan=-np.inf) > threshold))
    canary_median = float(np.median(np.nan_to_num(canary, nan=-np.inf))) if len(canary) else None
    return Validation(auroc, recall, threshold, median, spread,
                      float(finite.max()) if len(finite) else math.nan, canary_median,
                      len(normal), len(canary))


def most_separating(validations: Mapping[Key, Validation], tie: float) -> Key:
    """The key of the candidate whose canaries separate best from its held-back normals: the
    highest canary AUROC; among those within `tie` or the best AUROC's standard error of it
    (Hanley-McNeil: candidates that close cannot be told apart on a few dozen images), the widest
    margin between canary and normal scores in normal spreads (`Validation.separation`).
    Candidates without canary AUROC are never preferred to one that has it."""
    judged = {key: v for key, v in validations.items() if v.canary_auroc is not None}
    if not judged:
        raise ValueError("no candidate was validated on canaries")
    best = max(judged.values(), key=lambda v: v.canary_auroc)
    band = max(tie, best.auroc_error)
    tied = [key for key, v in judged.items() if v.canary_auroc >= best.canary_auroc - band]
    return max(tied, key=lambda key: judged[key].separation)


def selection_row(validation: Validation, normal_mean: float | None, chosen: bool) -> dict:
    """One candidate's row of a selection table (`format_selection`)."""
    return {"canary_auroc": validation.canary_auroc, "normal_mean": normal_mean,
            "normal_spread": validation.normal_spread, "separation": validation.separation,
            "chosen": chosen}


def make_canaries(images: Sequence[np.ndarray], regions: Sequence[np.ndarray | None],
                  seed: int) -> tuple[list[np.ndarray], list[int]]:
    """One synthetic defect pasted on each normal image, inside its region (bool at the image's
    size: where the model inspects; None: all but a margin), reproducibly from `seed`; with the
    indices of the images they were pasted on. An image that takes no defect of plausible size
    (a region of a few pixels, a flat black frame) gives none."""
    rng = np.random.default_rng(seed + CANARY_SEED_OFFSET)
    canaries, used = [], []
    for index, (image, region) in enumerate(zip(images, regions, strict=True)):
        if region is not None and not np.any(region):
            continue
        try:
            canaries.append(paste_defect(image, region, rng)[0])
        except RuntimeError:  # no pasted defect changed enough pixels
            continue
        used.append(index)
    return canaries, used


def format_selection(selection: dict) -> str:
    """Selection candidates as a table: canary AUROC, canary margin in normal spreads (the
    tie-break), normal scores, which was chosen ("-" where a row lacks a value)."""
    width = max(len("candidate"), *(len(name) for name in selection))
    columns = (("canary AUROC", "canary_auroc", ".4f"), ("canary margin", "separation", ".3g"),
               ("normal mean", "normal_mean", ".4g"), ("normal spread", "normal_spread", ".4g"))
    lines = [f"{'candidate':>{width}}" + "".join(f" {title:>13}" for title, _, _ in columns)]
    for name, row in selection.items():
        cells = "".join(
            f" {'-' if not _finite(row.get(key)) else format(row[key], spec):>13}"
            for _, key, spec in columns)
        lines.append(f"{name:>{width}}{cells}{'  <- chosen' if row.get('chosen') else ''}")
    return "\n".join(lines)


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def format_validation(calibration: dict | None, validation: dict | None) -> str:
    """One line on a fitted threshold: its false-alarm rate, how it was set, canary recall."""
    if not calibration:
        return "threshold not calibrated to a false-alarm rate (fitted before calibration)"
    line = (f"false alarms {calibration['far']:.3g} per normal part ({calibration['method']}, "
            f"{calibration['n_scores']} held-back scores)")
    if validation and validation.get("canary_auroc") is not None:
        line += (f"; canaries: recall {validation['recall']:.2f} at the threshold, AUROC "
                 f"{validation['canary_auroc']:.3f} ({validation['n_canaries']} canaries)")
    return line
