"""What a model file must satisfy before anything scores with it.

A model directory is data from disk: a manifest edited by hand, a truncated copy or a model from
another release must fail with one `ModelFileError` naming the field, never with a traceback, a
30 GB allocation, NaN scores or a threshold that lets every defect pass. Three layers:

- the manifest is covered by its own content hash (which includes the arrays' hash);
- every field scoring relies on is type- and range-checked, and every array is checked for shape
  and finiteness against the manifest (`check_manifest`, `check_arrays`);
- a probe: at save time the model scores one fixed synthetic image and records the score; a
  model whose backbone, weights or parameters no longer reproduce it is refused (`check_probe`).
  No check can stop a writer who recomputes everything on purpose; together they catch every
  inconsistent model, which is what a corrupted or hand-edited file is.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from glad.align import MOTIONS
from glad.backbones import BACKBONES, backbone_channels
from glad.errors import ModelFileError

CONTENT_HASH = "content_sha256"
MAX_INPUT_SIZE = 1024  # pixels per side; feature maps grow with its square
MAX_COMPONENTS = 4096  # Gaussians per layer
MAX_RADIUS = 32
MAX_BATCH = 1024
# Image scores are float32 sums of negative log-likelihoods: hundreds to thousands for parts like
# the training ones, but 1.3e8 for the probe image under a model of bottles (a legitimate model
# that a bound of 1e7 refused to load), so the bound only rules out overflow and planted values.
MAX_ABS_SCORE = 1e30
PROBE_TOLERANCE = 5e-2  # relative: exported runtimes agree within 1e-3, CUDA bf16 within 1e-2
WEIGHT_SUM_TOLERANCE = 1e-3


def manifest_digest(manifest: dict) -> str:
    """SHA-256 of the manifest's canonical JSON without its own content hash."""
    body = {key: value for key, value in manifest.items() if key != CONTENT_HASH}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def sealed(manifest: dict) -> dict:
    """The manifest with its content hash set."""
    return manifest | {CONTENT_HASH: manifest_digest(manifest)}


def probe_image(size: int) -> np.ndarray:
    """A fixed RGB uint8 image (smooth colour blobs and edges, the same on every machine) that
    fingerprints a model's scoring function."""
    rng = np.random.default_rng(20230103)
    coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    stripes = (np.arange(size) // max(1, size // 16) % 2 * 60).astype(np.uint8)
    return cv2.add(image, np.dstack([stripes[None, :].repeat(size, 0)] * 3))


class _Fields:
    """Reads manifest fields by dotted name, raising one ModelFileError per bad field."""

    def __init__(self, manifest: dict, where: Path):
        self.manifest, self.where = manifest, where

    def fail(self, name: str, problem: str) -> ModelFileError:
        return ModelFileError(f"{self.where}: manifest field {name!r} {problem}; "
                              "the model file was edited or is corrupt, refit or restore it")

    def get(self, name: str, kinds: type | tuple[type, ...], optional: bool = False):
        value = self.manifest
        for part in name.split("."):
            if not isinstance(value, dict) or part not in value:
                if optional:
                    return None
                raise self.fail(name, "is missing")
            value = value[part]
        if value is None and optional:
            return None
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _tuple(kinds)):
            raise self.fail(name, f"has the wrong type ({type(value).__name__})")
        return value

    def number(self, name: str, low: float, high: float, integer: bool = False,
               optional: bool = False) -> float | None:
        value = self.get(name, int if integer else (int, float), optional)
        if value is None:
            return None
        if not (math.isfinite(value) and low <= value <= high):
            raise self.fail(name, f"is {value!r}, outside [{low:g}, {high:g}]")
        return value

    def choice(self, name: str, allowed: Sequence) -> object:
        value = self.get(name, (str, bool, int, type(None)))
        if value not in allowed:
            raise self.fail(name, f"is {value!r}, not one of {list(allowed)}")
        return value

    def equal(self, name: str, value, expected) -> None:
        if value != expected:
            raise self.fail(name, f"is {value!r} where this backbone needs {expected!r}")


def _tuple(kinds) -> tuple:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def check_manifest(manifest: dict, where: Path) -> None:
    """Refuse a manifest that its content hash does not cover, or whose fields scoring relies on
    are missing, mistyped or out of range (see the module docstring)."""
    if manifest.get(CONTENT_HASH) != manifest_digest(manifest):
        raise ModelFileError(f"{where}: the manifest does not match its content hash (edited or "
                             "corrupt, or saved by a glad-stream without one); refit or restore it")
    fields = _Fields(manifest, where)
    name = fields.choice("backbone.name", BACKBONES)
    size = int(fields.number("backbone.input_size", 32, MAX_INPUT_SIZE, integer=True))
    strides = fields.get("backbone.strides", list)
    fields.equal("backbone.strides", strides, [4, 8, 16])
    if size % 16:
        raise fields.fail("backbone.input_size", f"is {size}, not a multiple of 16")
    channels = fields.get("backbone.channels", list)
    fields.equal("backbone.channels", channels, list(backbone_channels(name)))
    for key in ("mean", "std"):
        values = fields.get(f"backbone.{key}", list)
        if len(values) != 3 or not all(isinstance(v, int | float) and math.isfinite(v)
                                       for v in values):
            raise fields.fail(f"backbone.{key}", "is not three finite numbers")
        if key == "std" and min(values) <= 0:
            raise fields.fail("backbone.std", "has a value <= 0")
    fields.choice("backbone.weights", ("pretrained", "random", "file"))
    fields.get("backbone.antialiased", bool)
    layers = fields.get("layers", list)
    if len(layers) != len(strides):
        raise fields.fail("layers", f"lists {len(layers)} layers, not {len(strides)}")
    for index, (stride, dim) in enumerate(zip(strides, channels, strict=True)):
        prefix = f"layers.{index}"
        if not isinstance(layers[index], dict):
            raise fields.fail(prefix, "is not an object")
        layer = _Fields(layers[index], where)
        layer.number("n_components", 1, MAX_COMPONENTS, integer=True)
        fields.equal(f"{prefix}.dim", layer.get("dim", int), dim)
        fields.equal(f"{prefix}.grid", layer.get("grid", list), [size // stride] * 2)
        layer.get("local", bool)
    fields.number("radius", 0, MAX_RADIUS, integer=True, optional=True)
    threshold = fields.number("threshold", -MAX_ABS_SCORE, MAX_ABS_SCORE)
    calibrated = fields.number("calibration.threshold", -math.inf, math.inf, optional=True)
    if calibrated is not None and not math.isclose(threshold, calibrated, rel_tol=1e-9,
                                                   abs_tol=1e-9):
        raise fields.fail("threshold", f"is {threshold!r} while its calibration says "
                                       f"{calibrated!r}")
    fields.get("alignment.enabled", bool)
    fields.choice("alignment.motion", MOTIONS)
    fields.number("alignment.gates.max_rotation_deg", 0, 180, optional=True)
    fields.number("alignment.gates.min_correlation", -1, 1, optional=True)
    fields.number("params.quantile", 0, 1)
    fields.choice("params.local_mode", ("kmle", "blur"))
    fields.choice("params.neighbourhood", ("disk", "square"))
    fields.number("params.batch_size", 1, MAX_BATCH, integer=True)
    fields.choice("params.align", (True, False, "auto"))
    fields.choice("params.motion", MOTIONS)
    if fields.get("params.roi", str, optional=True) is not None:
        fields.choice("params.roi", ("full", "margin", "auto"))
    fields.number("training.n_images", 1, math.inf, integer=True)
    fields.number("training.jpeg_noise", 0, 100, integer=True, optional=True)
    fields.number("probe.score", -MAX_ABS_SCORE, MAX_ABS_SCORE)
    novelty = fields.get("online.novelty_loglik", list, optional=True) or []
    if len(novelty) not in (0, len(layers)) or not all(
            isinstance(v, int | float) and not math.isnan(v) for v in novelty):
        raise fields.fail("online.novelty_loglik", "is not one number per layer")


def check_arrays(arrays: dict[str, np.ndarray], manifest: dict, where: Path) -> None:
    """Refuse arrays whose shapes disagree with the manifest or that hold NaN or infinities
    where scoring needs numbers (mixture weights must also sum to one)."""
    size = manifest["backbone"]["input_size"]

    def array(key: str, shape: tuple, finite: bool = True) -> np.ndarray:
        if key not in arrays:
            raise ModelFileError(f"{where}: model arrays lack {key!r}")
        value = arrays[key]
        if value.shape != shape:
            raise ModelFileError(f"{where}: model array {key!r} has shape {value.shape}, "
                                 f"the manifest says {shape}")
        if finite and value.dtype.kind == "f" and not np.isfinite(value).all():
            raise ModelFileError(f"{where}: model array {key!r} holds NaN or infinite values")
        return value

    array("roi", (size, size))
    if manifest["alignment"]["enabled"]:
        array("reference", (size, size, 3))
    for index, layer in enumerate(manifest["layers"]):
        prefix = f"layer{index}."
        k, d, (h, w) = layer["n_components"], layer["dim"], layer["grid"]
        weights = array(prefix + "weights", (k,))
        if weights.min() <= 0 or abs(float(weights.sum()) - 1.0) > WEIGHT_SUM_TOLERANCE:
            raise ModelFileError(f"{where}: mixture weights of layer {index + 1} are not "
                                 "positive numbers summing to one")
        array(prefix + "means", (k, d))
        array(prefix + "whiteners", (k, d, d))
        array(prefix + "logdets", (k,))
        array(prefix + "counts", (k,))
        array(prefix + "image_support", (k,))
        if prefix + "stats.weight" in arrays:
            for name, shape in (("weight", (k,)), ("weight_sq", (k,)), ("scatter", (k, d, d)),
                                ("floor", (k,))):
                array(prefix + "stats." + name, shape)
        if layer["local"]:
            indptr = array(prefix + "local.indptr", (h * w + 1,))
            nnz = int(indptr[-1])
            if indptr[0] != 0 or np.any(np.diff(indptr) < 0) or nnz > h * w * k:
                raise ModelFileError(f"{where}: local weights of layer {index + 1} are not a "
                                     "valid sparse layout")
            components = array(prefix + "local.components", (nnz,))
            if nnz and (components.min() < 0 or components.max() >= k):
                raise ModelFileError(f"{where}: local weights of layer {index + 1} name "
                                     f"Gaussians outside 0..{k - 1}")
            log_weights = array(prefix + "local.log_weights", (nnz,))
            if nnz and log_weights.max() > 1e-4:
                raise ModelFileError(f"{where}: local weights of layer {index + 1} exceed one")
            if prefix + "local.counts" in arrays:
                array(prefix + "local.counts", (nnz,))
        if prefix + "covered" in arrays:
            array(prefix + "covered", (h * w,))
        if prefix + "noise" in arrays:
            noise = array(prefix + "noise", (d, d))
            if not np.allclose(noise, noise.T) or np.diagonal(noise).min() < 0:
                raise ModelFileError(f"{where}: the acquisition noise of layer {index + 1} is "
                                     "not a covariance (symmetric, non-negative diagonal)")


def check_probe(manifest: dict, score: float, where: Path) -> None:
    """Refuse a model whose probe score (`probe_image` scored now) differs from the one recorded
    when it was saved."""
    expected = manifest["probe"]["score"]
    if not (math.isfinite(score)
            and abs(score - expected) <= PROBE_TOLERANCE * max(1.0, abs(expected))):
        raise ModelFileError(f"{where}: the model scores its probe image {score:.6g}, not the "
                             f"{expected:.6g} recorded when it was saved: its backbone, weights "
                             "or parameters changed since; refit or restore it")
