"""`GladModel`: the GLAD detector as a scikit-learn-style estimator (fit / score / save / load).

fit: CNN features at three depths -> per layer a global Gaussian mixture (K-MLE + OAS,
`glad.layer_fit`) -> per position mixture weights (localized K-MLE) at the radius chosen on
held-back normal images and canaries, with a decision threshold from their scores
(`glad.selection`). Images are registered on a reference training image first
(`glad.registration`). score: per-pixel log-likelihood under the local mixture, summed over
layers -> heat map and image score (minus a low quantile of the map).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from glad.acquisition import jpeg_noise
from glad.align import Aligner, select_reference
from glad.backbones import Backbone, resolve_backbone
from glad.detector import ScoreResult
from glad.errors import DatasetError, NotFittedError
from glad.features import feature_batches, layer_features, layer_validity
from glad.images import LINE_JPEG_QUALITY, as_rgb, resize_square
from glad.integrity import check_probe, probe_image
from glad.layer_fit import FIT_BUDGET, LayerFitter, LayerModel
from glad.modelfile import read_model, restore_model, save_model
from glad.registration import (
    PERMISSIVE_GATES,
    Registered,
    register_images,
    register_training,
    to_frames,
)
from glad.scoring import build_roi, combine_layers, fill_invalid_cells, heatmaps, image_scores
from glad.selection import (
    SELECTION_TIE,
    UNALIGNED,
    Localisation,
    Selector,
    aligned_or_plain,
    covering,
    holdout_indices,
    judges_alignment,
    log_coverage,
    novelty_thresholds,
)
from glad.validation import DEFAULT_FAR, format_selection, most_separating, selection_row

log = logging.getLogger(__name__)


@dataclass(eq=False, repr=False)
class GladModel:
    """GLAD anomaly detector (Artola et al., WACV 2023) for one product or texture.

    Parameters are stored as given (scikit-learn convention; a dataclass); learned attributes end in "_".
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
    No Gaussian is narrower than the feature change of a JPEG round trip at quality
    `jpeg_noise` (0: no floor), measured on the training images (`glad.acquisition`), so frames
    that a camera, a video stream or the line's transport compressed score as their originals.
    """

    backbone: str | Backbone = "efficientnet_lite0"
    weights: str = "pretrained"
    antialiased: bool = False
    device: str = "cpu"
    n_components: int | str = "auto"
    max_components: int = 256
    mixture: str = "kmle"
    init: str = "kmle++"
    max_iter: int = 30
    rel_tol: float = 1e-6
    max_fit_samples: int = 50_000
    fit_budget: float = FIT_BUDGET
    min_images: int = 3
    oas_formula: str = "sklearn"
    local: bool = True
    radius: int | str = "auto"
    local_mode: str = "blur"
    neighbourhood: str = "disk"
    n_candidates: int = 32
    quantile: float = 0.005
    roi: str | np.ndarray = "full"
    align: bool | str = "auto"
    motion: str = "euclidean"
    holdout: float = 0.15
    far: float = DEFAULT_FAR
    jpeg_noise: int = LINE_JPEG_QUALITY
    select: bool = True
    batch_size: int = 8
    seed: int = 0
    progress: bool = False

    # --- fitting --------------------------------------------------------------------------------

    def fit(self, images: Sequence[np.ndarray]) -> GladModel:
        """Learn the model from normal images (RGB uint8, any size; resized to the input size)."""
        if len(images) < 2:
            raise DatasetError(f"GLAD needs at least 2 normal training images, got {len(images)}")
        started = time.perf_counter()
        self.backbone_ = resolve_backbone(self.backbone, self.weights, self.antialiased, self.device)
        size = self.backbone_.spec.input_size
        originals = self._resized(images)
        reference = originals[select_reference(originals)]
        self.roi_ = build_roi(self.roi, reference, size)
        self.reference_ = reference if self._aligning() else None
        self.align_gates_ = dict(PERMISSIVE_GATES)
        training = register_training(originals, size, self._build_aligner(), self.reference_,
                                     auto=self.align == "auto", far=self.far)
        self.reference_, self.align_gates_ = training.reference, training.gates
        self.aligner_ = self._build_aligner()
        images, pixel_valid, m = training.images, training.valid, len(training.images)
        features = layer_features(self.backbone_, images, self.batch_size, self.progress, "features")
        held = holdout_indices(m, self.holdout, self.seed)
        fitting = np.setdiff1d(np.arange(m), held)
        valid = layer_validity(pixel_valid, [f.shape[1:3] for f in features])
        fitter = self._layer_fitter()
        layers = [fitter.fit(f[fitting], v[fitting], index)
                  for index, (f, v) in enumerate(zip(features, valid, strict=True))]
        if self.jpeg_noise:
            noise = jpeg_noise(self.backbone_, images, features, valid, fitting, self.jpeg_noise,
                               self.batch_size, self.progress)
            layers = [layer.with_noise(n) for layer, n in zip(layers, noise, strict=True)]
        selector = self._selector()
        chosen = selector.localisation(images, features, pixel_valid, layers, held, fitting)
        if judges_alignment(self.select, self.align, self.roi, self.reference_ is not None, held):
            plain = [originals[i] for i in training.kept]
            unaligned = selector.localisation(
                plain, layer_features(self.backbone_, plain, self.batch_size, self.progress,
                                      "features, not aligned"),
                np.ones_like(pixel_valid), layers, held, fitting, UNALIGNED)
            chosen = self._keep_alignment_or_not(chosen, unaligned)
        self.radius_, self.selection_ = chosen.radius, chosen.selection
        layers = covering(selector.localized(layers, chosen.candidates, self.radius_),
                          chosen.covered)
        log_coverage(layers, self.min_images)
        self.calibration_, self.validation_ = selector.calibration(chosen, layers, self.far)
        self.threshold_ = self.calibration_.threshold
        unseen = held if len(held) else np.arange(m)  # images the mixtures were not fitted on
        self.layers_ = layers
        self.online_ = {"novelty_loglik": novelty_thresholds(chosen, layers, unseen)}
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

    def _layer_fitter(self) -> LayerFitter:
        """How each layer's global mixture is fitted, under this model's parameters (the
        fitter's fields are named after them)."""
        return LayerFitter(**self._params_named_like(LayerFitter))

    def _selector(self) -> Selector:
        """The fit-time model selection under this model's parameters and fitted ROI."""
        return Selector(backbone=self.backbone_, roi=self.roi_,
                        **self._params_named_like(Selector, exclude=("backbone", "roi")))

    def _params_named_like(self, helper: type, exclude: tuple[str, ...] = ()) -> dict:
        """This model's parameters that a helper dataclass has fields of the same name for."""
        return {f.name: getattr(self, f.name) for f in fields(helper) if f.name not in exclude}

    def _keep_alignment_or_not(self, aligned: Localisation, plain: Localisation) -> Localisation:
        """The localisation `glad.selection.aligned_or_plain` keeps; when it is the images as
        they are, the model stops aligning."""
        chosen = aligned_or_plain(aligned, plain)
        if chosen is plain:
            self.reference_, self.aligner_ = None, None
        return chosen

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

    def register(self, images: Sequence[np.ndarray]) -> Registered:
        """Images at the input size, aligned on the reference when aligning; their validity
        (B, S, S) and alignments (None when not aligning). A frame that fails alignment stays in
        place with validity all False; its alignment carries the reason."""
        return register_images(self._resized(images), self.backbone_.spec.input_size,
                               self.aligner_, self.reference_)

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
        return ScoreResult(scores, maps, to_frames(scores, maps, alignments))

    def score_features(self, features: list[torch.Tensor],
                       valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image scores (B,) and heat maps (B, S, S) in the reference frame, from backbone
        features (B, d, h, w) per layer of registered images and their pixel validity (B, S, S).
        Scores leave out the cells of invalid features; heat maps fill them from their valid
        neighbours (`fill_invalid_cells`) so that every valid pixel shows every layer."""
        self._check_fitted()
        grids = [f.shape[2:] for f in features]
        logliks = self.layer_logliks(features, layer_validity(valid, grids))
        size = self.backbone_.spec.input_size
        total = combine_layers(logliks, size)
        holes = any(bool(torch.isnan(loglik).any()) for loglik in logliks)
        shown = combine_layers([fill_invalid_cells(x) for x in logliks], size) if holes else total
        roi = self.roi_ & torch.from_numpy(np.asarray(valid, dtype=bool))
        return image_scores(total, roi, self.quantile), heatmaps(shown, roi)

    def layer_logliks(self, features: list[torch.Tensor],
                      valid: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Per layer, the log-likelihood map (B, h, w) of backbone features (B, d, h, w);
        `valid` (B, h*w) per layer marks the cells to score (others are NaN)."""
        flat = [f.flatten(2).transpose(1, 2).contiguous() for f in features]
        valid = valid or [None] * len(flat)
        return [layer.loglik(f, v) for f, v, layer in zip(flat, valid, self._scoring_layers(),
                                                            strict=True)]

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
        return sum(layer.nbytes for layer in self.layers_)

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
        spec = file.backbone.spec
        model = cls(backbone=file.backbone, weights=spec.weights, antialiased=spec.antialiased,
                    device=device, **file.manifest.get("params", {}))
        restore_model(model, file)
        model.aligner_ = model._build_aligner()
        check_probe(file.manifest, model.probe_score(), file.path)
        return model

    # --- helpers --------------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not hasattr(self, "layers_"):
            raise NotFittedError("this GladModel is not fitted yet: call fit() or load() first")


def fit_best_backbone(images: Sequence[np.ndarray], backbones: Sequence[str],
                      **params) -> GladModel:
    """Fit one model per backbone on the same images and keep the one whose held-back normals
    and canaries separate best (`glad.validation.most_separating`, the rule that picks the
    radius). Held-back images and canaries are the same for every backbone (they depend on the
    images and the seed only), so the candidates are judged on equal terms; each candidate is
    a full fit, so the fit time adds up. The backbones' rows join the model's `selection_`."""
    if not backbones:
        raise ValueError("fit_best_backbone needs at least one backbone")
    models = {name: GladModel(backbone=name, **params).fit(images) for name in backbones}
    if len(models) == 1:
        return models[backbones[0]]
    validated = {name: m.validation_ for name, m in models.items() if m.validation_ is not None}
    if not validated:
        raise ValueError("choosing a backbone needs held-back images (at least 4 training images "
                         "and holdout > 0)")
    best = most_separating(validated, SELECTION_TIE)
    rows = {f"backbone {name}": selection_row(v, None, name == best)
            for name, v in validated.items()}
    log.info("backbone chosen on %d held-back normals and their canaries:\n%s",
             validated[best].n_normals, format_selection(rows))
    chosen = models[best]
    chosen.selection_ = rows | chosen.selection_
    return chosen
