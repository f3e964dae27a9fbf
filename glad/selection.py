"""Fit-time model selection from normal images alone (the mechanism is `glad.validation`'s).

Once each layer's global mixture is fitted, `GladModel.fit` still has to choose: the localisation
radius (or the global mixture) under which held-back normal images and the same images with
synthetic defects pasted on (canaries) separate best, whether registering on the reference helps
at all, the decision threshold, and the novelty log-likelihoods online updates start from. Every
choice is judged on images the mixtures were not fitted on (`holdout_indices`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from glad.backbones import Backbone
from glad.features import covered_cells, layer_features, layer_validity
from glad.layer_fit import LayerModel
from glad.local_weights import Candidates, fit_local_weights, top_candidates
from glad.mixture import global_loglik
from glad.scoring import combine_layers, image_scores, layer_costs, loglik_from_costs
from glad.validation import (
    Calibration,
    Validation,
    calibrate_threshold,
    format_selection,
    make_canaries,
    most_separating,
    selection_row,
    validate,
)

log = logging.getLogger(__name__)

RADIUS_CANDIDATES = (1, 2, 4)
# Localisation candidates whose canary AUROC is within this of the best, or within its standard
# error when that is larger, are tied (with 30 held-back images and 30 canaries, one swapped
# pair moves it by 0.0011; with 8 and 8 the error is about 0.05 near 0.97).
SELECTION_TIE = 0.005
UNALIGNED = "unaligned "  # prefix of the selection table's rows for the images as they are
NOVELTY_QUANTILE = 1e-3  # see novelty_thresholds

# Per layer (features (B, HW, d), validity (B, HW)) of some images.
LayerFeatures = list[tuple[torch.Tensor, torch.Tensor]]
# Per layer (costs against every Gaussian (B, HW, K), validity (B, HW)) of some images.
LayerCosts = list[tuple[torch.Tensor, torch.Tensor]]


def holdout_indices(m: int, holdout: float, seed: int) -> np.ndarray:
    """The indices, among `m` training images, held back from the mixtures' fit to judge it on:
    a `holdout` share of them (none below 4 images or when it is 0), drawn from `seed`."""
    if m < 4 or holdout <= 0:
        return np.array([], dtype=np.int64)
    # at least 6 (a third of a small set): the threshold's bound widens fast below that
    count = max(2, min(6, m // 3), int(round(holdout * m)))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(m, size=min(count, m - 2), replace=False))


def radius_name(radius: int | None) -> str:
    """A localisation candidate's name in the selection table."""
    return "global" if radius is None else f"r={radius}"


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


@dataclass
class Localisation:
    """One way of presenting training images to the mixtures (registered on the reference, or
    as they are): their features, local candidates, and the radius chosen on held-back images."""

    flat: list[torch.Tensor]  # per layer (M, HW, d)
    valid: list[torch.Tensor]  # per layer (M, HW)
    candidates: list[Candidates] | None
    radius: int | None
    held_scores: np.ndarray | None  # held-back normals' scores at that radius
    canary_scores: np.ndarray
    selection: dict  # the radius candidates' table
    validation: Validation | None  # at the chosen radius
    # per layer, the cells scored (`glad.features.covered_cells` of the images the mixtures
    # were fitted on; None: every cell), the same in the selection and in the model
    covered: list[torch.Tensor | None]


@dataclass(frozen=True, eq=False)
class Selector:
    """The fit-time choices of one model: `backbone` extracts the canaries' features (in batches
    of `batch_size`), `roi` is the fitted ROI; the other fields are `GladModel`'s constructor
    parameters of the same names."""

    backbone: Backbone
    roi: torch.Tensor
    quantile: float
    batch_size: int
    local: bool
    radius: int | str
    select: bool
    n_candidates: int
    min_images: int
    neighbourhood: str
    local_mode: str
    seed: int
    progress: bool

    def localisation(self, images: Sequence[np.ndarray], features: list[torch.Tensor],
                     pixel_valid: np.ndarray, layers: list[LayerModel], held: np.ndarray,
                     fitting: np.ndarray, prefix: str = "") -> Localisation:
        """Local candidates of registered (or plain) training images under the fitted mixtures,
        and the localisation radius chosen on their held-back images and canaries."""
        m = len(images)
        valid = layer_validity(pixel_valid, [f.shape[1:3] for f in features])
        flat = [f.reshape(m, -1, f.shape[-1]) for f in features]
        candidates = None
        unseen = held if len(held) else np.arange(m)  # images the mixtures were not fitted on
        if self.local:
            candidates = [top_candidates(f, v, layer.factors, self.n_candidates, unseen,
                                         keep_costs=len(held) > 0)
                          for f, v, layer in tqdm(list(zip(flat, valid, layers, strict=True)),
                                                  desc=f"{prefix}local candidates", unit="layer",
                                                  disable=not self.progress)]
        covered = [None if bool(c.all()) else c
                   for c in covered_cells([v[fitting] for v in valid], self.min_images)]
        layers = covering(layers, covered)
        held_costs = self._held_costs(flat, valid, layers, candidates, held)
        if candidates is not None:  # the held-back costs are only needed until the radius is chosen
            candidates = [replace(c, full_costs=None) for c in candidates]
        canary_costs = self._canary_costs(images, pixel_valid, held, valid, layers)
        return Localisation(flat, valid, candidates, *self._select_radius(
            layers, candidates, held_costs, canary_costs, held, fitting, prefix), covered=covered)

    def localized(self, layers: list[LayerModel], candidates: list[Candidates] | None,
                  radius: int | None) -> list[LayerModel]:
        """The layers with local weights at `radius` (None: global) learned from the training
        images whose candidates are given."""
        if radius is None:
            return [replace(layer, local=None) for layer in layers]
        out = []
        for layer, cand in zip(layers, candidates, strict=True):
            local = fit_local_weights(cand, layer.factors.log_weights, layer.grid, radius,
                                      self.neighbourhood, self.local_mode)
            out.append(replace(layer, local=local))
        return out

    def calibration(self, chosen: Localisation, layers: list[LayerModel],
                    far: float) -> tuple[Calibration, Validation]:
        """The threshold for `far` false alarms per normal part, calibrated on the held-back
        scores under the chosen localisation, and how the canaries fare at it."""
        held_scores = chosen.held_scores
        if held_scores is None:  # nothing held back: the training images' own (optimistic) scores
            held_scores = self._scores_of(list(zip(chosen.flat, chosen.valid, strict=True)), layers)
        calibration = calibrate_threshold(held_scores, far)
        validation = validate(held_scores, chosen.canary_scores, calibration.threshold)
        log.info("threshold %.4g for %.3g false alarms per normal part (%s on %d held-back "
                 "scores); canary recall %s, canary AUROC %s", calibration.threshold, far,
                 calibration.method, calibration.n_scores,
                 _share(validation.recall), _share(validation.canary_auroc))
        return calibration, validation

    def _held_costs(self, flat: list[torch.Tensor], valid: list[torch.Tensor],
                    layers: list[LayerModel], candidates: list[Candidates] | None,
                    held: np.ndarray) -> LayerCosts | None:
        """Per layer, the held-back images' costs against every Gaussian (kept by the candidates'
        pass when there is one) and their validity; None when nothing is held back."""
        if not len(held):
            return None
        costs = ([c.full_costs for c in candidates] if candidates is not None else
                 [layer_costs(f[held], layer.factors) for f, layer in zip(flat, layers, strict=True)])
        return list(zip(costs, [v[held] for v in valid], strict=True))

    def _canary_costs(self, images: Sequence[np.ndarray], pixel_valid: np.ndarray,
                      held: np.ndarray, valid: list[torch.Tensor],
                      layers: list[LayerModel]) -> LayerCosts | None:
        """Per layer, the costs against every Gaussian (B, HW, K) and the validity of the
        held-back images with one synthetic defect pasted on each inside the ROI
        (`glad.validation.make_canaries`)."""
        if not len(held):
            return None
        regions = [self.roi.numpy() & np.asarray(pixel_valid[i], bool) for i in held]
        canaries, used = make_canaries([images[i] for i in held], regions, self.seed)
        if not canaries:
            return None
        features = layer_features(self.backbone, canaries, self.batch_size, self.progress,
                                  "canaries")
        return [(layer_costs(f.reshape(len(canaries), -1, f.shape[-1]), layer.factors),
                 v[held[used]]) for f, v, layer in zip(features, valid, layers, strict=True)]

    def _select_radius(self, layers: list[LayerModel], candidates: list[Candidates] | None,
                       held_costs: LayerCosts | None, canary_costs: LayerCosts | None,
                       held: np.ndarray, fitting: np.ndarray, prefix: str = ""):
        """The localisation radius (None = global weights), chosen on held-back normal images
        and their canaries (`select=True`: the best canary AUROC; among the candidates within
        SELECTION_TIE or its standard error of it, the widest margin between canary and normal
        scores in normal spreads, `Validation.separation`) or by the lowest mean held-back score
        (`select=False`, the former rule).

        Returns it with the held-back images' and the canaries' scores under the layers localized
        on the other images at that radius (None when nothing is held back), the table of
        candidates (names start with `prefix`) and the chosen one's `Validation`.
        """
        radii = (*RADIUS_CANDIDATES, None) if self.radius == "auto" else (int(self.radius),)
        if not self.local:
            radii = (None,)
        elif self.radius == "auto" and not len(held):
            radii = RADIUS_CANDIDATES[:1]
        if not len(held):
            return radii[0], None, np.zeros(0), {}, None
        scored = {}
        fitted = None if candidates is None else [c.of_images(fitting) for c in candidates]
        for radius in tqdm(radii, desc=f"{prefix}localisation radius", unit="radius",
                           disable=not self.progress or len(radii) == 1):
            localized = self.localized(layers, fitted, radius)
            normal = self._scores_from_costs(held_costs, localized)
            canary = (self._scores_from_costs(canary_costs, localized)
                      if canary_costs is not None else np.zeros(0))
            scored[radius] = (normal, canary, validate(normal, canary))
        best = self._best_localisation(scored)
        table = {prefix + radius_name(r): selection_row(v, float(np.mean(normal)), r == best)
                 for r, (normal, _, v) in scored.items()}
        if len(radii) > 1:
            log.info("localisation chosen on %d held-back normals and %d canaries (%s):\n%s",
                     len(held), len(scored[best][1]),
                     "canary AUROC" if self.select else "lowest mean normal score",
                     format_selection(table))
        return best, scored[best][0], scored[best][1], table, scored[best][2]

    def _best_localisation(self, scored: dict) -> int | None:
        """The radius to keep from {radius: (normal scores, canary scores, Validation)}."""
        judged = {r: v for r, (_, _, v) in scored.items() if v.canary_auroc is not None}
        if not self.select or not judged:  # the former rule (also when no canary could be drawn)
            return min(scored, key=lambda r: float(np.mean(scored[r][0])))
        return most_separating(judged, SELECTION_TIE)

    def _scores_from_costs(self, costs: LayerCosts, layers: list[LayerModel]) -> np.ndarray:
        """Image scores from per-layer costs against every Gaussian (`layer_costs`) and validity,
        under each layer's local weights, or its global ones when it has none: every
        localisation candidate reads the same costs."""
        return self._image_scores([
            layer.masked(loglik_from_costs(
                c, layer.factors.log_weights if layer.local is None else layer.local,
                layer.factors.dim), v)
            for (c, v), layer in zip(costs, layers, strict=True)])

    def _scores_of(self, features: LayerFeatures, layers: list[LayerModel]) -> np.ndarray:
        """Image scores of (features (B, HW, d), validity (B, HW)) per layer."""
        return self._image_scores([layer.loglik(f, v)
                                   for (f, v), layer in zip(features, layers, strict=True)])

    def _image_scores(self, logliks: list[torch.Tensor]) -> np.ndarray:
        """Image scores from per-layer log-likelihood maps (B, h, w), NaN where invalid (§4.3-4.5)."""
        total = combine_layers(logliks, self.backbone.spec.input_size)
        return image_scores(total, self.roi, self.quantile)


def covering(layers: list[LayerModel], covered: list[torch.Tensor | None]) -> list[LayerModel]:
    """The layers scoring only their `covered` cells (`Localisation.covered`)."""
    return [replace(layer, covered=c) for layer, c in zip(layers, covered, strict=True)]


def log_coverage(layers: list[LayerModel], min_images: int) -> None:
    """Say how many cells per layer go unscored for want of training images that covered them."""
    left_out = [0 if layer.covered is None else int((~layer.covered).sum()) for layer in layers]
    if any(left_out):
        log.info("cells not scored, valid in fewer than %d training images: %s", min_images,
                 ", ".join(f"layer {i + 1}: {n} of {layer.grid[0] * layer.grid[1]}"
                           for i, (n, layer) in enumerate(zip(left_out, layers, strict=True))))


def judges_alignment(select: bool, align: bool | str, roi: str | np.ndarray, aligning: bool,
                     held: np.ndarray) -> bool:
    """Whether the fit also judges the training images without alignment: when it chose to
    align by itself (align="auto", and `aligning`), selects (select=True), has held-back images
    to judge on, and inspects the whole image (other ROIs are drawn in the reference's frame)."""
    return (select and align == "auto" and aligning and len(held) > 0
            and isinstance(roi, str) and roi == "full")


def aligned_or_plain(aligned: Localisation, plain: Localisation) -> Localisation:
    """Which of the registered and the plain training images the model keeps, with both tables
    merged into its `selection`. Alignment is kept only when it neither makes the canaries less
    separable (beyond the canary AUROC's standard error) nor the held-back normals less well
    explained (a higher score, on average over the same images, by more than its standard
    error); otherwise the model does not align (a rotation-symmetric part registered to a wrong
    angle, a part whose pose never varied). A part that barely moves scores the same either
    way: a strict comparison of the means flipped on 0.03 in 250 (pill_tablet)."""
    a, p = aligned.validation, plain.validation
    band = max(SELECTION_TIE, a.auroc_error or 0.0)
    worse_canaries = (a.canary_auroc is not None and p.canary_auroc is not None
                      and a.canary_auroc < p.canary_auroc - band)
    worse_normals = _worse_beyond_error(aligned.held_scores, plain.held_scores)
    keep = not (worse_canaries or worse_normals)
    for row in (plain if keep else aligned).selection.values():
        row["chosen"] = False
    if not keep:
        log.warning("alignment dropped: on held-back images it %s (canary AUROC %s aligned, "
                    "%s not; mean normal score %.4g aligned, %.4g not)",
                    "made canaries less separable" if worse_canaries else
                    "explained normal images less well", _share(a.canary_auroc),
                    _share(p.canary_auroc), float(np.mean(aligned.held_scores)),
                    float(np.mean(plain.held_scores)))
    chosen = aligned if keep else plain
    chosen.selection = aligned.selection | plain.selection
    return chosen


def _worse_beyond_error(scores: np.ndarray, others: np.ndarray) -> bool:
    """Whether `scores` exceed `others` (paired: the same images) on average by more than the
    standard error of the mean difference."""
    difference = np.asarray(scores, np.float64) - np.asarray(others, np.float64)
    error = difference.std(ddof=1) / math.sqrt(len(difference)) if len(difference) > 1 else 0.0
    return float(difference.mean()) > error


def novelty_thresholds(chosen: Localisation, layers: list[LayerModel],
                       images: np.ndarray) -> list[float]:
    """Per layer, the NOVELTY_QUANTILE of the given images' valid vectors' global-mixture
    log-likelihood (from the candidates' pass when there is one): online updates treat
    vectors below it as a new appearance (§7.4), not as more of a known one."""
    out = []
    for index, (f, v, layer) in enumerate(zip(chosen.flat, chosen.valid, layers, strict=True)):
        keep = v[images]
        if chosen.candidates is not None:
            loglik = chosen.candidates[index].loglik[images][keep].double()
        else:
            loglik = global_loglik(f[images][keep], layer.factors)
        out.append(float(torch.quantile(loglik, NOVELTY_QUANTILE)) if len(loglik) else -math.inf)
    return out
