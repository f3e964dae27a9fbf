"""Model files: one directory holding `manifest.json` and `arrays.safetensors`. No pickle.

The manifest records the schema version, the backbone and preprocessing (with its hash), each
layer's K and grid, the threshold, the training summary, the SHA-256 of the array file, the score
of a probe image and its own content hash. Loading checks all of it (`glad.integrity`) and raises
`ModelFileError` / `ModelMismatchError` with one clear sentence.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from glad.backbones import BackboneSpec, FeatureExtractor
from glad.errors import ModelFileError, ModelMismatchError
from glad.integrity import check_arrays, check_manifest, sealed
from glad.layer_fit import LayerModel
from glad.local_weights import LocalWeights
from glad.manifest import MANIFEST, SCHEMA, SCHEMA_VERSION, read_manifest
from glad.mixture import ComponentStats, GaussianMixture, MixtureFactors
from glad.runtime import carry_export, file_sha256, open_backbone
from glad.validation import Calibration, Validation

ARRAYS = "arrays.safetensors"
__all__ = ["ARRAYS", "MANIFEST", "SCHEMA", "SCHEMA_VERSION", "ModelFile", "read_manifest",
           "read_model", "restore_model", "save_model"]

# Constructor parameters that shape scoring; restored on load so a loaded model scores identically.
_SCORING_PARAMS = ("quantile", "local_mode", "neighbourhood", "batch_size", "align", "motion")
# The ROI mode, when it is a name ("auto" confines alignment to the part); masks travel as arrays.
# Sufficient statistics stored per layer (means and support are the mixture's own arrays).
_STATS = ("weight", "weight_sq", "scatter", "floor")


def save_model(model, path: Path) -> Path:
    """Write `model` (a fitted GladModel) to directory `path`, atomically replacing its files."""
    path.mkdir(parents=True, exist_ok=True)
    arrays = {"roi": model.roi_.numpy().astype(np.uint8)}
    if model.reference_ is not None:
        arrays["reference"] = model.reference_
    layers = []
    for index, layer in enumerate(model.layers_):
        prefix = f"layer{index}."
        mix, factors = layer.mixture, layer.factors
        arrays |= {
            prefix + "weights": mix.weights,
            prefix + "means": mix.means,
            prefix + "counts": mix.counts.astype(np.int64),
            prefix + "image_support": mix.image_support.astype(np.int64),
            prefix + "whiteners": factors.whiteners.numpy(),
            prefix + "logdets": factors.logdets.numpy(),
        }
        if mix.stats is not None:
            arrays |= {prefix + "stats." + name: getattr(mix.stats, name) for name in _STATS}
            # the scatters are most of the file: float32 on disk (7 significant digits, far
            # below what OAS shrinkage and decay change), float64 again in memory for merges
            arrays[prefix + "stats.scatter"] = mix.stats.scatter.astype(np.float32)
        if layer.local is not None:
            arrays |= {
                prefix + "local.indptr": layer.local.indptr,
                prefix + "local.components": layer.local.components,
                prefix + "local.log_weights": layer.local.log_weights,
            }
            if layer.local.counts is not None:
                arrays[prefix + "local.counts"] = layer.local.counts
        if layer.covered is not None:
            arrays[prefix + "covered"] = layer.covered.numpy().astype(np.uint8)
        if mix.noise is not None:
            arrays[prefix + "noise"] = mix.noise
        layers.append({"index": index + 1, "n_components": mix.n_components,
                       "dim": int(mix.means.shape[1]), "grid": list(layer.grid),
                       "local": layer.local is not None})
    spec = model.backbone_.spec
    manifest = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "backbone": spec.to_dict(),
        "preprocessing_hash": spec.preprocessing_hash(),
        "layers": layers,
        "radius": model.radius_,
        "alignment": {"enabled": model.reference_ is not None, "motion": model.motion,
                      "gates": model.align_gates_},
        "threshold": model.threshold_,
        "calibration": model.calibration_.to_dict() if model.calibration_ else None,
        "validation": model.validation_.to_dict() if model.validation_ else None,
        "params": {name: getattr(model, name) for name in _SCORING_PARAMS}
        | ({"roi": model.roi} if isinstance(model.roi, str) else {}),
        "training": {"n_images": model.n_train_images_, "fit_seconds": model.fit_seconds_,
                     "selection": model.selection_, "jpeg_noise": model.jpeg_noise},
        "online": model.online_,
        "probe": {"score": model.probe_score()},
    }
    with tempfile.TemporaryDirectory(dir=path) as tmp:
        tmp_arrays = Path(tmp) / ARRAYS
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp_arrays))
        manifest["arrays_sha256"] = file_sha256(tmp_arrays)
        tmp_manifest = Path(tmp) / MANIFEST
        tmp_manifest.write_text(json.dumps(sealed(manifest), indent=2, sort_keys=True))
        os.replace(tmp_arrays, path / ARRAYS)
        os.replace(tmp_manifest, path / MANIFEST)
    carry_export(model.backbone_, path)
    return path


@dataclass
class ModelFile:
    """A model directory read and checked (`read_model`): what `GladModel.load` builds from."""

    path: Path
    manifest: dict
    arrays: dict[str, np.ndarray]
    backbone: FeatureExtractor

    def layer(self, index: int) -> LayerModel:
        """Layer `index`: its mixture, scoring factors, grid, local weights (None: global) and
        covered cells (None: all)."""
        info = self.manifest["layers"][index]
        return _layer(self.arrays, f"layer{index}.", tuple(info["grid"]), info["local"])


def read_model(path: Path, backbone: str | FeatureExtractor | None = None, device: str = "cpu",
               runtime: str | None = None) -> ModelFile:
    """Read a model directory; `backbone` (a name or a built backbone) must match the one it was
    fit with. Every manifest field and array is checked first (`glad.integrity`).

    Without a built backbone, `runtime` (else $GLAD_RUNTIME, else "auto") says what runs it:
    an exported one in the model directory when there is one (see `glad.runtime`), or torch.
    The content hash covers the arrays file only, so exported backbones beside it (with their
    own sidecar and hashes) do not disturb it.
    """
    manifest = read_manifest(path)
    check_manifest(manifest, path)
    arrays_file = path / ARRAYS
    if not arrays_file.is_file():
        raise ModelFileError(f"{path}: model arrays file {ARRAYS} is missing")
    if file_sha256(arrays_file) != manifest.get("arrays_sha256"):
        raise ModelFileError(f"{arrays_file}: content hash does not match the manifest (corrupt?)")
    try:
        arrays = load_file(str(arrays_file))
    except Exception as error:  # safetensors raises its own error types
        raise ModelFileError(f"{arrays_file}: unreadable ({error})") from None
    check_arrays(arrays, manifest, path)
    spec = BackboneSpec.from_dict(manifest["backbone"])
    return ModelFile(path, manifest, arrays, _matching_backbone(spec, backbone, device, path,
                                                                runtime))


def restore_model(model, file: ModelFile) -> None:
    """Give `model` (a GladModel built with the file's parameters) the learned attributes that
    `save_model` wrote to `file`, all but its aligner (which the model builds from them)."""
    manifest = file.manifest
    model.backbone_ = file.backbone
    model.roi_ = torch.from_numpy(file.arrays["roi"].astype(bool))
    model.reference_ = file.arrays.get("reference")
    model.align_gates_ = manifest.get("alignment", {}).get("gates", {})
    model.layers_ = [file.layer(index) for index in range(len(manifest["layers"]))]
    model.radius_ = manifest["radius"]
    model.threshold_ = manifest["threshold"]
    model.n_train_images_ = manifest["training"]["n_images"]
    model.fit_seconds_ = manifest["training"]["fit_seconds"]
    model.selection_ = manifest["training"].get("selection", {})
    model.jpeg_noise = manifest["training"].get("jpeg_noise", 0)  # older models have no floor
    model.calibration_ = record_of(Calibration, manifest.get("calibration"))
    model.validation_ = record_of(Validation, manifest.get("validation"))
    model.online_ = manifest.get("online") or {}
    model.manifest_ = manifest


def _matching_backbone(spec: BackboneSpec, backbone, device: str, path: Path,
                       runtime: str | None) -> FeatureExtractor:
    if backbone is None or isinstance(backbone, str):
        if backbone not in (None, spec.name):
            raise ModelMismatchError(
                f"{path}: model was fitted on backbone {spec.name}, not {backbone}")
        return open_backbone(path, spec, device, runtime)
    if backbone.spec.preprocessing_hash() != spec.preprocessing_hash():
        raise ModelMismatchError(
            f"{path}: model was fitted on {spec.name} (preprocessing {spec.preprocessing_hash()}); "
            f"the given backbone is {backbone.spec.name} "
            f"(preprocessing {backbone.spec.preprocessing_hash()})")
    return backbone


def _layer(arrays: dict, prefix: str, grid: tuple[int, int], local: bool) -> LayerModel:
    try:
        weights = arrays[prefix + "weights"]
        means = arrays[prefix + "means"]
        whiteners = torch.from_numpy(arrays[prefix + "whiteners"])
        factors = MixtureFactors(
            whiteners=whiteners,
            offsets=torch.einsum("kij,kj->ki", whiteners.double(),
                                 torch.from_numpy(means)).float().contiguous(),
            logdets=torch.from_numpy(arrays[prefix + "logdets"]),
            log_weights=torch.log(torch.from_numpy(weights)),
        )
        stats = None
        if prefix + "stats.weight" in arrays:
            stats = ComponentStats(**{name: arrays[prefix + "stats." + name].astype(np.float64)
                                      for name in _STATS},
                                   mean=means, support=arrays[prefix + "image_support"])
        mixture = GaussianMixture(weights, means, covariances=_covariances(whiteners),
                                  counts=arrays[prefix + "counts"],
                                  image_support=arrays[prefix + "image_support"], stats=stats,
                                  noise=arrays.get(prefix + "noise"))  # None in older models
        sparse = None
        if local:
            sparse = LocalWeights(grid, len(weights), arrays[prefix + "local.indptr"],
                                  arrays[prefix + "local.components"],
                                  arrays[prefix + "local.log_weights"],
                                  arrays.get(prefix + "local.counts"))
    except KeyError as error:
        raise ModelFileError(f"model arrays lack {error.args[0]}") from None
    covered = arrays.get(prefix + "covered")  # models fitted before it score every cell
    return LayerModel(mixture, factors, grid, sparse,
                      covered=None if covered is None else torch.from_numpy(covered.astype(bool)))


def _covariances(whiteners: torch.Tensor) -> np.ndarray:
    """Sigma_k = (W_k^T W_k)^-1, rebuilt from the stored whiteners."""
    inverse = torch.linalg.inv(whiteners.double())
    return (inverse @ inverse.transpose(1, 2)).numpy()


def record_of(kind, data: dict | None):
    """A `Calibration` or `Validation` from its manifest entry (None in models fitted before
    thresholds were calibrated, and in online versions that carry production's)."""
    if not isinstance(data, dict):
        return None
    names = {f.name for f in fields(kind)}
    return kind(**{key: value for key, value in data.items() if key in names})
