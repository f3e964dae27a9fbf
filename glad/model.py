"""`GladModel`: the GLAD detector as a scikit-learn-style estimator (fit / score / save / load).

fit: CNN features at three depths -> per layer a global Gaussian mixture (K-MLE + OAS) -> per
position mixture weights (localized K-MLE) -> a decision threshold from held-back normal images.
score: per-pixel log-likelihood under the local mixture, summed over layers -> heat map and
image score (minus a low quantile of the map).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from glad.align import Aligner, object_mask, rotation_and_scale, select_reference, unwarp_heatmap
from glad.backbones import Backbone, resolve_backbone
from glad.detector import ScoreResult
from glad.errors import DatasetError, NotFittedError
from glad.features import feature_batches, layer_validity
from glad.images import as_rgb, resize_square
from glad.integrity import check_probe, probe_image
from glad.local_weights import Candidates, LocalWeights, fit_local_weights, top_candidates
from glad.mixture import (
    CANDIDATES,
    FULL_PASS_EVERY,
    ComponentStats,
    FitReport,
    GaussianMixture,
    MixtureFactors,
    fit_em,
    fit_kmle,
    global_loglik,
)
from glad.modelfile import read_model, record_of, save_model
from glad.scoring import (
    choose_method,
    combine_layers,
    heatmaps,
    image_scores,
    layer_loglik_dense,
    layer_loglik_sparse,
    roi_mask,
)
from glad.validation import (
    DEFAULT_FAR,
    Calibration,
    Validation,
    calibrate_threshold,
    format_selection,
    make_canaries,
    validate,
)

log = logging.getLogger(__name__)

RADIUS_CANDIDATES = (1, 2, 4)
# Alignment gates (spec §6.3 step 5) are calibrated on the training frames: they are first aligned
# with the permissive gates, then the model keeps max(default, 1.5 x the largest training
# rotation) and min(default, 0.95 x the lowest training correlation), within these bounds.
PERMISSIVE_GATES = {"max_rotation_deg": 45.0, "min_correlation": 0.5}
DEFAULT_GATES = {"max_rotation_deg": 20.0, "min_correlation": 0.8}
# Localisation candidates whose canary AUROC is within this of the best, or within its standard
# error when that is larger, are tied (with 30 held-back images and 30 canaries, one swapped
# pair moves it by 0.0011; with 8 and 8 the error is about 0.05 near 0.97).
SELECTION_TIE = 0.005
UNALIGNED = "unaligned "  # prefix of the selection table's rows for the images as they are
BASE_FLOOR_SHARE = 0.25  # see _base_statistics
NOVELTY_QUANTILE = 1e-3  # see _novelty_thresholds
AUTO_ALIGN_MAX_FAILURES = 0.1  # share of training images; above it align="auto" turns alignment off
# K-MLE's assignment work per layer in whitening multiply-adds (d^2 per vector and component
# compared), about 25 s on the 2-core development CPU. See kmle_sample_size. EfficientNet-Lite0's
# layers (d <= 112) stay under it at 50 000 vectors; ResNet18's and WideResNet50-2's deep layers
# are subsampled. A tenth of it cost 0.7-4.8 AUROC points on three real categories (layer 3 fitted
# on 7 000 instead of 50 000 vectors), so it only guards against d^2 x N blowing up.
FIT_BUDGET = 1e12
MIN_SAMPLES_PER_COMPONENT = 16  # K-MLE keeps at least this many vectors per starting component


def kmle_sample_size(available: int, k: int, d: int, max_iter: int, max_samples: int,
                     budget: float = FIT_BUDGET) -> int:
    """How many of a layer's `available` training vectors K-MLE fits on.

    All of them up to `max_samples`, fewer when the expected assignment work would exceed
    `budget` multiply-adds: d^2 per (vector, component) pair, against all K components in a full
    pass every FULL_PASS_EVERY iterations and against CANDIDATES in the others. Deep layers
    (large d) get fewer vectors, so the fit time no longer grows with d^2 x N; never fewer than
    MIN_SAMPLES_PER_COMPONENT per starting component, so K-MLE keeps something to prune from.
    """
    full_passes = 1 + max_iter // FULL_PASS_EVERY
    per_vector = d * d * (k * full_passes + CANDIDATES * max_iter)
    affordable = int(budget // per_vector)
    return min(available, max(min(max_samples, affordable), MIN_SAMPLES_PER_COMPONENT * k))


def _base_statistics(stats: ComponentStats, sample_weight: float) -> ComponentStats:
    """A batch fit's statistics as an online update starts from them: each fitted vector stands
    for `sample_weight` training vectors (K-MLE ran on a subsample), and every component keeps a
    floor of min(1/4 of its count, 2 d) so a rare but legitimate variant is never forgotten (§7.5)."""
    stats = stats.scaled(sample_weight)
    floor = np.minimum(BASE_FLOOR_SHARE * stats.weight, 2.0 * stats.mean.shape[1])
    return replace(stats, floor=floor)


def _radius_name(radius: int | None) -> str:
    return "global" if radius is None else f"r={radius}"


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


@dataclass
class LayerModel:
    """Everything GLAD learned about one feature layer."""

    mixture: GaussianMixture
    factors: MixtureFactors
    grid: tuple[int, int]
    local: LocalWeights | None  # None: global mixture weights at every position
    report: FitReport | None = None

    def loglik(self, features: torch.Tensor, valid: torch.Tensor | None = None,
               method: str = "auto") -> torch.Tensor:
        """(B, HW, d) features -> (B, h, w) log-likelihood map, NaN where `valid` is False.

        `method` picks how local weights are evaluated (§4.6): "sparse" (active pairs only),
        "dense" (all K, masked) or "auto" (`glad.scoring.choose_method`).
        """
        method = choose_method(method, features.device)
        if self.local is None:
            out = layer_loglik_dense(features, self.factors, self.factors.log_weights)
        elif method == "dense":
            out = layer_loglik_dense(features, self.factors, self.local.dense_log(features.device))
        else:
            out = layer_loglik_sparse(features, self.factors, self.local)
        if valid is not None:
            out = out.masked_fill(~valid.to(out.device), math.nan)
        return out.view(-1, *self.grid)


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


class GladModel:
    """GLAD anomaly detector (Artola et al., WACV 2023) for one product or texture.

    Parameters are stored as given (scikit-learn convention); learned attributes end in "_".
    `align="auto"` registers every image on a reference training image (spec §6) unless the ROI
    is the texture margin; frames that cannot be aligned are left out of training and reported,
    never scored, at test time (score +inf, status says why).
    `n_components="auto"` starts K-MLE from min(max_components, N / (2 d)) Gaussians per layer
    and lets OAS and pruning shrink it. `radius="auto"` picks the localisation radius (or the
    global mixture) under which held-back normal images and the same images with synthetic
    defects pasted on (canaries) separate best (`select=False`: the radius under which
    held-back normals score lowest), so parts that move between images are not punished by
    over-sharp local weights. The threshold is calibrated to `far` false alarms per normal part
    on the held-back scores (`glad.validation.calibrate_threshold`); `calibration_` says how,
    `validation_` gives the canary AUROC and recall at it, `selection_` the candidates' table.
    """

    def __init__(
        self,
        backbone: str | Backbone = "efficientnet_lite0",
        weights: str = "pretrained",
        antialiased: bool = False,
        device: str = "cpu",
        n_components: int | str = "auto",
        max_components: int = 256,
        mixture: str = "kmle",
        init: str = "kmle++",
        max_iter: int = 30,
        rel_tol: float = 1e-6,
        max_fit_samples: int = 50_000,
        fit_budget: float = FIT_BUDGET,
        min_images: int = 3,
        oas_formula: str = "sklearn",
        local: bool = True,
        radius: int | str = "auto",
        local_mode: str = "blur",
        neighbourhood: str = "disk",
        n_candidates: int = 32,
        quantile: float = 0.005,
        roi: str | np.ndarray = "full",
        align: bool | str = "auto",
        motion: str = "euclidean",
        holdout: float = 0.15,
        far: float = DEFAULT_FAR,
        select: bool = True,
        batch_size: int = 8,
        seed: int = 0,
        progress: bool = False,
    ):
        self.backbone = backbone
        self.weights = weights
        self.antialiased = antialiased
        self.device = device
        self.n_components = n_components
        self.max_components = max_components
        self.mixture = mixture
        self.init = init
        self.max_iter = max_iter
        self.rel_tol = rel_tol
        self.max_fit_samples = max_fit_samples
        self.fit_budget = fit_budget
        self.min_images = min_images
        self.oas_formula = oas_formula
        self.local = local
        self.radius = radius
        self.local_mode = local_mode
        self.neighbourhood = neighbourhood
        self.n_candidates = n_candidates
        self.quantile = quantile
        self.roi = roi
        self.align = align
        self.motion = motion
        self.holdout = holdout
        self.far = far
        self.select = select
        self.batch_size = batch_size
        self.seed = seed
        self.progress = progress

    # --- fitting --------------------------------------------------------------------------------

    def fit(self, images: Sequence[np.ndarray]) -> GladModel:
        """Learn the model from normal images (RGB uint8, any size; resized to the input size)."""
        if len(images) < 2:
            raise DatasetError(f"GLAD needs at least 2 normal training images, got {len(images)}")
        started = time.perf_counter()
        self.backbone_ = resolve_backbone(self.backbone, self.weights, self.antialiased, self.device)
        originals = self._resized(images)
        reference = originals[select_reference(originals)]
        self.roi_ = self._build_roi(reference)
        self.reference_ = reference if self._aligning() else None
        self.align_gates_ = dict(PERMISSIVE_GATES)
        self.aligner_ = self._build_aligner()
        images, pixel_valid, kept = self._register_training(originals)
        features = self._features(images, "features")
        m = len(images)
        held = self._holdout_indices(m)
        fitting = np.setdiff1d(np.arange(m), held)
        valid = layer_validity(pixel_valid, [f.shape[1:3] for f in features])
        layers = [self._fit_layer(f[fitting], v[fitting], index)
                  for index, (f, v) in enumerate(zip(features, valid, strict=True))]
        chosen = self._localisation(images, features, pixel_valid, layers, held, fitting, "")
        if self._checks_alignment(held):
            plain = [originals[i] for i in kept]
            unaligned = self._localisation(plain, self._features(plain, "features, not aligned"),
                                           np.ones_like(pixel_valid), layers, held, fitting,
                                           UNALIGNED)
            chosen = self._keep_alignment_or_not(chosen, unaligned)
        self.radius_, self.selection_ = chosen.radius, chosen.selection
        layers = self._localized(layers, chosen.candidates, self.radius_, np.arange(m))
        held_scores = chosen.held_scores
        if held_scores is None:  # nothing held back: the training images' own (optimistic) scores
            held_scores = self._scores_of(list(zip(chosen.flat, chosen.valid, strict=True)), layers)
        self.calibration_ = calibrate_threshold(held_scores, self.far)
        self.threshold_ = self.calibration_.threshold
        self.validation_ = validate(held_scores, chosen.canary_scores, self.threshold_)
        log.info("threshold %.4g for %.3g false alarms per normal part (%s on %d held-back "
                 "scores); canary recall %s, canary AUROC %s", self.threshold_, self.far,
                 self.calibration_.method, self.calibration_.n_scores,
                 _share(self.validation_.recall), _share(self.validation_.canary_auroc))
        unseen = held if len(held) else np.arange(m)  # images the mixtures were not fitted on
        self.layers_ = layers
        self.online_ = {"novelty_loglik": self._novelty_thresholds(chosen.flat, chosen.valid,
                                                                   chosen.candidates, unseen)}
        self.n_train_images_ = m
        self.fit_seconds_ = time.perf_counter() - started
        return self

    def without_local_weights(self) -> GladModel:
        """The paper's global ablation of this fitted model: same mixtures, pi_k(x) = pi_k.

        For comparisons of scores only: its threshold is undefined (NaN).
        """
        self._check_fitted()
        twin = copy.copy(self)
        twin.local, twin.radius_, twin.threshold_ = False, None, math.nan
        twin.layers_ = [replace(layer, local=None) for layer in self.layers_]
        return twin

    def _build_roi(self, reference: np.ndarray) -> torch.Tensor:
        """The ROI at the input size: "full", "margin" (textures), "auto" (the part in the
        reference, spec §4.4), a polygon [(x, y), ...] in reference pixels, or a mask."""
        size = self.backbone_.spec.input_size
        if isinstance(self.roi, str) and self.roi == "auto":
            return torch.from_numpy(object_mask(reference))
        if isinstance(self.roi, str):
            return roi_mask(self.roi, size)
        roi = np.asarray(self.roi)
        if roi.ndim == 2 and roi.shape[1] == 2 and roi.shape != (size, size):  # a polygon
            points = np.round(roi).astype(np.int32)
            roi = cv2.fillPoly(np.zeros((size, size), np.uint8), [points], 1)
        roi = torch.as_tensor(roi > 0)
        if roi.shape != (size, size):
            raise ValueError(f"ROI mask must be {size}x{size}, got {tuple(roi.shape)}")
        return roi

    def _features(self, images: Sequence[np.ndarray], desc: str) -> list[torch.Tensor]:
        """Per layer (N, h, w, d) float32 on the CPU."""
        per_batch = [[f.permute(0, 2, 3, 1).cpu() for f in batch] for batch in feature_batches(
            self.backbone_, images, self.batch_size, self.progress, desc)]
        return [torch.cat([b[i] for b in per_batch]) for i in range(len(per_batch[0]))]

    def _holdout_indices(self, m: int) -> np.ndarray:
        if m < 4 or self.holdout <= 0:
            return np.array([], dtype=np.int64)
        # at least 6 (a third of a small set): the threshold's bound widens fast below that
        count = max(2, min(6, m // 3), int(round(self.holdout * m)))
        rng = np.random.default_rng(self.seed)
        return np.sort(rng.choice(m, size=min(count, m - 2), replace=False))

    def _fit_mixture(self, features: torch.Tensor, valid: torch.Tensor,
                     layer: int) -> tuple[GaussianMixture, FitReport]:
        m, h, w, d = features.shape
        keep = valid.flatten()
        x = features.reshape(-1, d)[keep]
        image_ids = np.repeat(np.arange(m), h * w)[keep.numpy()]
        k = self.n_components
        if k == "auto":
            k = int(np.clip(m * h * w // (2 * d), 8, self.max_components))
        samples = kmle_sample_size(len(x), int(k), d, self.max_iter, self.max_fit_samples,
                                   self.fit_budget)
        if len(x) > samples:
            rng = np.random.default_rng(self.seed + layer)
            rows = np.sort(rng.choice(len(x), size=samples, replace=False))
            x, image_ids = x[torch.from_numpy(rows)], image_ids[rows]
        common = dict(init=self.init, max_iter=self.max_iter, rel_tol=self.rel_tol,
                      oas_formula=self.oas_formula, seed=self.seed + layer)
        if self.mixture == "kmle":
            with tqdm(total=self.max_iter, desc=f"layer {layer + 1} K-MLE", unit="it",
                      disable=not self.progress) as bar:
                def show(iteration: int, n_components: int, loglik: float) -> None:
                    bar.update(1)
                    bar.set_postfix(K=n_components, ll=f"{loglik / len(x):.4g}/vector")

                mixture, report = fit_kmle(x, image_ids, int(k), min_images=min(self.min_images, m),
                                           on_iteration=show, **common)
            mixture.stats = _base_statistics(mixture.stats, int(keep.sum()) / len(x))
            return mixture, report
        if self.mixture == "em":
            return fit_em(x, image_ids, int(k), **common)
        raise ValueError(f"unknown mixture {self.mixture!r}; use 'kmle' or 'em'")

    def _fit_layer(self, features: torch.Tensor, valid: torch.Tensor, index: int) -> LayerModel:
        started = time.perf_counter()
        mixture, report = self._fit_mixture(features, valid, index)
        log.info("layer %d: K=%d after %d K-MLE iterations (%s), log-likelihood %.4g, %.1f s",
                 index + 1, mixture.n_components, report.iterations, report.stop_reason,
                 report.log_likelihood, time.perf_counter() - started)
        return LayerModel(mixture, mixture.factors(), tuple(features.shape[1:3]), None, report)

    def _localized(self, layers: list[LayerModel], candidates, radius: int | None,
                   images: np.ndarray) -> list[LayerModel]:
        """The layers with local weights learned from the given training images (None: global)."""
        if radius is None:
            return [replace(layer, local=None) for layer in layers]
        out = []
        for layer, cand in zip(layers, candidates, strict=True):
            local = fit_local_weights(cand.of_images(images), layer.factors.log_weights, layer.grid, radius,
                                      self.neighbourhood, self.local_mode)
            out.append(replace(layer, local=local))
        return out

    def _canary_features(self, images: Sequence[np.ndarray], pixel_valid: np.ndarray,
                         held: np.ndarray, valid: list[torch.Tensor]):
        """Per layer, features (B, HW, d) and validity of the held-back images with one synthetic
        defect pasted on each inside the ROI (`glad.validation.make_canaries`)."""
        if not len(held):
            return None
        regions = [self.roi_.numpy() & np.asarray(pixel_valid[i], bool) for i in held]
        canaries, used = make_canaries([images[i] for i in held], regions, self.seed)
        if not canaries:
            return None
        features = self._features(canaries, "canaries")
        return [(f.reshape(len(canaries), -1, f.shape[-1]), v[held[used]])
                for f, v in zip(features, valid, strict=True)]

    def _localisation(self, images: Sequence[np.ndarray], features: list[torch.Tensor],
                      pixel_valid: np.ndarray, layers: list[LayerModel], held: np.ndarray,
                      fitting: np.ndarray, prefix: str) -> Localisation:
        """Local candidates of registered (or plain) training images under the fitted mixtures,
        and the localisation radius chosen on their held-back images and canaries."""
        m = len(images)
        valid = layer_validity(pixel_valid, [f.shape[1:3] for f in features])
        flat = [f.reshape(m, -1, f.shape[-1]) for f in features]
        candidates = None
        unseen = held if len(held) else np.arange(m)  # images the mixtures were not fitted on
        if self.local:
            candidates = [top_candidates(f, v, layer.factors, self.n_candidates, unseen)
                          for f, v, layer in tqdm(list(zip(flat, valid, layers, strict=True)),
                                                  desc=f"{prefix}local candidates", unit="layer",
                                                  disable=not self.progress)]
        held_features = [(f[held], v[held]) for f, v in zip(flat, valid, strict=True)]
        canary_features = self._canary_features(images, pixel_valid, held, valid)
        return Localisation(flat, valid, candidates, *self._select_radius(
            layers, candidates, held_features, canary_features, held, fitting, prefix))

    def _select_radius(self, layers, candidates, held_features, canary_features, held, fitting,
                       prefix: str = ""):
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
        for radius in tqdm(radii, desc=f"{prefix}localisation radius", unit="radius",
                           disable=not self.progress or len(radii) == 1):
            localized = self._localized(layers, candidates, radius, fitting)
            if radius is None and candidates is not None:  # the candidates' pass scored them
                normal = self._global_scores(candidates, held_features, held, layers)
            else:
                normal = self._scores_of(held_features, localized)
            canary = (self._scores_of(canary_features, localized) if canary_features is not None
                      else np.zeros(0))
            scored[radius] = (normal, canary, validate(normal, canary))
        best = self._best_localisation(scored)
        table = {prefix + _radius_name(r): {
            "canary_auroc": v.canary_auroc, "normal_mean": float(np.mean(normal)),
            "normal_spread": v.normal_spread, "chosen": r == best}
            for r, (normal, _, v) in scored.items()}
        if len(radii) > 1:
            log.info("localisation chosen on %d held-back normals and %d canaries (%s):\n%s",
                     len(held), len(scored[best][1]),
                     "canary AUROC" if self.select else "lowest mean normal score",
                     format_selection(table))
        return best, scored[best][0], scored[best][1], table, scored[best][2]

    def _checks_alignment(self, held: np.ndarray) -> bool:
        """Whether the fit also judges the same images without alignment: when it chose to
        align by itself (align="auto"), selects (select=True), has held-back images to judge
        on, and inspects the whole image (other ROIs are drawn in the reference's frame)."""
        return (self.select and self.align == "auto" and self.reference_ is not None
                and len(held) > 0 and isinstance(self.roi, str) and self.roi == "full")

    def _keep_alignment_or_not(self, aligned: Localisation, plain: Localisation) -> Localisation:
        """Alignment is kept only when it neither makes the canaries less separable (beyond the
        canary AUROC's standard error) nor the held-back normals less well explained (a higher
        mean score); otherwise the model does not align (a rotation-symmetric part registered to
        a wrong angle, a part whose pose never varied)."""
        a, p = aligned.validation, plain.validation
        band = max(SELECTION_TIE, a.auroc_error or 0.0)
        worse_canaries = (a.canary_auroc is not None and p.canary_auroc is not None
                          and a.canary_auroc < p.canary_auroc - band)
        worse_normals = float(np.mean(aligned.held_scores)) > float(np.mean(plain.held_scores))
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
            self.reference_, self.aligner_ = None, None
        chosen = aligned if keep else plain
        chosen.selection = aligned.selection | plain.selection
        return chosen

    def _best_localisation(self, scored: dict) -> int | None:
        """The radius to keep from {radius: (normal scores, canary scores, Validation)}."""
        judged = {r: v for r, (_, _, v) in scored.items() if v.canary_auroc is not None}
        if not self.select or not judged:  # the former rule (also when no canary could be drawn)
            return min(scored, key=lambda r: float(np.mean(scored[r][0])))
        best = max(judged.values(), key=lambda v: v.canary_auroc)
        band = max(SELECTION_TIE, best.auroc_error)
        tied = [r for r, v in judged.items() if v.canary_auroc >= best.canary_auroc - band]
        return max(tied, key=lambda r: judged[r].separation)

    def _global_scores(self, candidates: list[Candidates],
                       held_features: list[tuple[torch.Tensor, torch.Tensor]],
                       held: np.ndarray, layers: list[LayerModel]) -> np.ndarray:
        """Image scores of the held-back images under the global mixtures, from the global
        log-likelihoods the candidates' pass computed (no second pass over every Gaussian)."""
        return self._image_scores([
            torch.where(v, c.loglik[held], math.nan).view(len(held), *layer.grid)
            for c, (_, v), layer in zip(candidates, held_features, layers, strict=True)])

    def _novelty_thresholds(self, features: list[torch.Tensor], valid: list[torch.Tensor],
                            candidates: list[Candidates] | None, images: np.ndarray) -> list[float]:
        """Per layer, the NOVELTY_QUANTILE of the given images' valid vectors' global-mixture
        log-likelihood (from the candidates' pass when there is one): online updates treat
        vectors below it as a new appearance (§7.4), not as more of a known one."""
        out = []
        for index, (f, v, layer) in enumerate(zip(features, valid, self.layers_, strict=True)):
            keep = v[images]
            if candidates is not None:
                loglik = candidates[index].loglik[images][keep].double()
            else:
                loglik = global_loglik(f[images][keep], layer.factors)
            out.append(float(torch.quantile(loglik, NOVELTY_QUANTILE)) if len(loglik) else -math.inf)
        return out

    def _scores_of(self, features: list[tuple[torch.Tensor, torch.Tensor]], layers) -> np.ndarray:
        """Image scores of (features (B, HW, d), validity (B, HW)) per layer."""
        return self._image_scores([layer.loglik(f, v)
                                   for (f, v), layer in zip(features, layers, strict=True)])

    def _image_scores(self, logliks: list[torch.Tensor]) -> np.ndarray:
        """Image scores from per-layer log-likelihood maps (B, h, w), NaN where invalid (§4.3-4.5)."""
        total = combine_layers(logliks, self.backbone_.spec.input_size)
        return image_scores(total, self.roi_, self.quantile)

    # --- alignment ------------------------------------------------------------------------------

    def _aligning(self) -> bool:
        if self.align == "auto":
            return not (isinstance(self.roi, str) and self.roi == "margin")
        return bool(self.align)

    def _resized(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Validated RGB images at the input size."""
        size = self.backbone_.spec.input_size
        return [resize_square(as_rgb(image), size) for image in images]

    def _build_aligner(self) -> Aligner | None:
        """An aligner on `reference_` (None when not aligning), confined to an automatic ROI."""
        if self.reference_ is None:
            return None
        auto_roi = isinstance(self.roi, str) and self.roi == "auto"
        return Aligner(self.reference_, motion=self.motion,
                       mask=self.roi_.numpy() if auto_roi else None, **self.align_gates_)

    def _calibrate_gates(self, alignments: list) -> None:
        """Widen the default gates to the pose spread of the (aligned) training frames."""
        accepted = [a for a in alignments if a is not None and a.ok]
        if not accepted:
            return
        rotation = max(abs(rotation_and_scale(a.warp)[0]) for a in accepted)
        correlation = min(a.correlation for a in accepted)
        self.align_gates_ = {
            "max_rotation_deg": float(np.clip(1.5 * rotation, DEFAULT_GATES["max_rotation_deg"],
                                              PERMISSIVE_GATES["max_rotation_deg"])),
            "min_correlation": float(np.clip(0.95 * correlation, PERMISSIVE_GATES["min_correlation"],
                                             DEFAULT_GATES["min_correlation"])),
        }
        self.aligner_ = self._build_aligner()

    def register(self, images: Sequence[np.ndarray]):
        """Images at the input size, aligned on the reference when aligning; their validity
        (B, S, S) and alignments (None when not aligning). A frame that fails alignment stays in
        place with validity all False; its alignment carries the reason."""
        size = self.backbone_.spec.input_size
        resized = self._resized(images)
        if self.aligner_ is None:
            return resized, np.ones((len(resized), size, size), dtype=bool), [None] * len(resized)
        out, valid, alignments = [], [], []
        for image in resized:
            result = self.aligner_.align(image)
            alignments.append(result)
            if result.ok:  # out-of-frame pixels show the reference, and are masked anyway
                out.append(np.where(result.valid[..., None], result.aligned, self.reference_))
                valid.append(result.valid)
            else:
                out.append(image)
                valid.append(np.zeros((size, size), dtype=bool))
        return out, np.stack(valid), alignments

    def _register_training(self, images: Sequence[np.ndarray]):
        """Registered training images, their validity and their indices among `images`,
        without the frames that failed alignment.

        With align="auto", a product whose normal images often fail alignment (more than
        AUTO_ALIGN_MAX_FAILURES of them: their pose varies beyond the gates, e.g. parts swinging
        on a hook) is modelled without alignment instead, and the log says so.
        """
        registered, valid, alignments = self.register(images)
        failed = [a.reason for a in alignments if a is not None and not a.ok]
        if failed and self.align == "auto" and len(failed) > AUTO_ALIGN_MAX_FAILURES * len(images):
            log.warning("%d of %d training images failed alignment (e.g. %s): the pose varies "
                        "beyond the gates, so this model does not align", len(failed),
                        len(images), failed[0])
            self.reference_, self.aligner_ = None, None
            registered, valid, alignments = self.register(images)
        self._calibrate_gates(alignments)
        keep = [i for i, a in enumerate(alignments) if a is None or a.ok]
        for alignment in alignments:
            if alignment is not None and not alignment.ok:
                log.warning("training image left out: %s", alignment.reason)
        if len(keep) < 2:
            raise DatasetError(f"only {len(keep)} of {len(images)} training images could be "
                               "aligned on the reference; fit with align=False for this product")
        return [registered[i] for i in keep], valid[keep], np.array(keep)

    # --- scoring --------------------------------------------------------------------------------

    def score(self, images: Sequence[np.ndarray]) -> ScoreResult:
        """Image scores (higher = more anomalous) and heat maps at the input size."""
        self._check_fitted()
        if len(images) == 0:
            size = self.backbone_.spec.input_size
            return ScoreResult(np.zeros(0), np.zeros((0, size, size), np.float32))
        aligned, valid, alignments = self.register(images)
        scores, maps, start = [], [], 0
        for batch in feature_batches(self.backbone_, aligned, self.batch_size, self.progress,
                                     "scoring"):
            rows = slice(start, start + len(batch[0]))
            batch_scores, batch_maps = self.score_features(batch, valid[rows])
            scores.append(batch_scores)
            maps.append(batch_maps)
            start = rows.stop
        scores, maps = np.concatenate(scores), np.concatenate(maps)
        status = []
        for index, alignment in enumerate(alignments):
            if alignment is not None and not alignment.ok:
                scores[index], maps[index] = math.inf, 0.0
            elif alignment is not None:  # back to the frame, for display and pixel metrics
                maps[index] = unwarp_heatmap(maps[index], alignment, maps[index].shape)
            status.append("ok" if alignment is None or alignment.ok else alignment.reason)
        return ScoreResult(scores, maps, status)

    def score_features(self, features: list[torch.Tensor],
                       valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image scores (B,) and heat maps (B, S, S) in the reference frame, from backbone
        features (B, d, h, w) per layer of registered images and their pixel validity (B, S, S)."""
        self._check_fitted()
        grids = [f.shape[2:] for f in features]
        total = self.loglik_map(features, layer_validity(valid, grids))
        roi = self.roi_ & torch.from_numpy(np.asarray(valid, dtype=bool))
        return image_scores(total, roi, self.quantile), heatmaps(total, roi)

    def loglik_map(self, features: list[torch.Tensor],
                   valid: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Summed log-likelihood map (B, S, S) of backbone features (B, d, h, w) per layer;
        `valid` (B, h*w) per layer marks the cells to score (others are NaN)."""
        flat = [f.flatten(2).transpose(1, 2).contiguous() for f in features]
        valid = valid or [None] * len(flat)
        logliks = [layer.loglik(f, v) for f, v, layer in zip(flat, valid, self._scoring_layers(),
                                                              strict=True)]
        return combine_layers(logliks, self.backbone_.spec.input_size)

    def _scoring_layers(self) -> list[LayerModel]:
        """The layers with their factors on the backbone's device (cached per device)."""
        key = (self.backbone_.device, id(self.layers_))
        if getattr(self, "_device_layers", (None, None))[0] != key:
            moved = [replace(layer, factors=layer.factors.to(key[0])) for layer in self.layers_]
            self._device_layers = (key, moved)
        return self._device_layers[1]

    def probe_score(self) -> float:
        """The score of `glad.integrity.probe_image` as it is (no alignment): a fingerprint of
        the scoring function, recorded when the model is saved and checked when it is loaded."""
        self._check_fitted()
        size = self.backbone_.spec.input_size
        features = self.backbone_.extract(probe_image(size)[None])
        return float(self.score_features(features, np.ones((1, size, size), dtype=bool))[0][0])

    def decide(self, scores: np.ndarray) -> np.ndarray:
        """True where a score exceeds the model's threshold, and where it is NaN (a frame the
        model could not score is never passed as normal, as the score stage decides)."""
        self._check_fitted()
        if math.isnan(self.threshold_):
            raise ValueError("this model has no decision threshold (an ablation copy)")
        scores = np.asarray(scores, dtype=np.float64)
        return (scores > self.threshold_) | np.isnan(scores)

    def model_bytes(self) -> int:
        """Bytes of the learned parameters (mixtures and sparse local weights)."""
        self._check_fitted()
        total = 0
        for layer in self.layers_:
            f = layer.factors
            total += sum(t.numel() * t.element_size() for t in
                         (f.whiteners, f.offsets, f.logdets, f.log_weights))
            if layer.local is not None:
                total += layer.local.indptr.nbytes + layer.local.components.nbytes
                total += layer.local.log_weights.nbytes
        return total

    # --- persistence ----------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the model as a directory of safe files (manifest.json + arrays.safetensors)."""
        self._check_fitted()
        return save_model(self, Path(path))

    @classmethod
    def load(cls, path: str | Path, backbone: str | Backbone | None = None,
             device: str = "cpu", runtime: str | None = None) -> GladModel:
        """Read a saved model; refuses one whose backbone/preprocessing differs from `backbone`,
        and one that fails `glad.integrity`'s checks (including its probe image's score).
        `runtime` (auto, torch, onnx, openvino; default $GLAD_RUNTIME or auto) runs the backbone."""
        file = read_model(Path(path), backbone=backbone, device=device, runtime=runtime)
        manifest, spec = file.manifest, file.backbone.spec
        model = cls(backbone=file.backbone, weights=spec.weights, antialiased=spec.antialiased,
                    device=device, **manifest.get("params", {}))
        model.backbone_ = file.backbone
        model.roi_ = torch.from_numpy(file.arrays["roi"].astype(bool))
        model.reference_ = file.arrays.get("reference")
        model.align_gates_ = manifest.get("alignment", {}).get("gates", {})
        model.aligner_ = model._build_aligner()
        model.layers_ = [LayerModel(*file.layer(index)) for index in range(len(manifest["layers"]))]
        model.radius_ = manifest["radius"]
        model.threshold_ = manifest["threshold"]
        model.n_train_images_ = manifest["training"]["n_images"]
        model.fit_seconds_ = manifest["training"]["fit_seconds"]
        model.selection_ = manifest["training"].get("selection", {})
        model.calibration_ = record_of(Calibration, manifest.get("calibration"))
        model.validation_ = record_of(Validation, manifest.get("validation"))
        model.online_ = manifest.get("online") or {}
        model.manifest_ = manifest
        check_probe(manifest, model.probe_score(), file.path)
        return model

    # --- helpers --------------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not hasattr(self, "layers_"):
            raise NotFittedError("this GladModel is not fitted yet: call fit() or load() first")
