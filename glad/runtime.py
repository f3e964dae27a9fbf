"""Exported backbones: the CNN part of a model run by ONNX Runtime or OpenVINO instead of torch.

The backbone is most of GLAD's CPU scoring time, and both runtimes run EfficientNet-Lite0 several
times faster than torch's frozen TorchScript on a small CPU (bench/bench_backbone.py). `glad
export MODEL --format onnx|openvino` writes the backbone (uint8 NHWC images in, preprocessing
included, the tapped layers out, any batch size) into the model directory beside a sidecar
`backbone.<format>.json`; the sidecar records the backbone spec and preprocessing hash, the input
size and the SHA-256 of every exported file, so a file that belongs to another backbone, or is
corrupt, is refused instead of producing features that mean something else.

Loading a model (`open_backbone`) picks the runtime: `runtime=` or `GLAD_RUNTIME` = auto (default:
the first usable export, else torch), torch, onnx or openvino. Exported runtimes run on the CPU
only; on other devices the model keeps torch.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

from glad.backbones import (
    Backbone,
    BackboneSpec,
    FeatureExtractor,
    backbone_for_spec,
    check_images,
)
from glad.errors import GladError, ModelFileError, ModelMismatchError
from glad.manifest import read_manifest

log = logging.getLogger(__name__)

RUNTIME_ENV = "GLAD_RUNTIME"
SIDECAR_SCHEMA = "glad-backbone-export"
OPSET = 17
INPUT = "images"
# An export is refused when its features differ from torch's by more than this (max |diff| over
# max |torch| per layer); f32 runtimes measure about 1e-6 (bench/bench_backbone.py).
MAX_REL_DIFF = 1e-3

Runner = Callable[[np.ndarray], list[np.ndarray]]


class RuntimeUnavailableError(GladError):
    """A backbone runtime that was asked for but cannot run here (package, file or device)."""


def open_onnxruntime(path: Path, threads: int, spinning: bool = False) -> Runner:
    """ONNX Runtime on the CPU. Idle intra-op threads sleep instead of spinning (`spinning`,
    ONNX Runtime's default, is there for bench/bench_backbone.py): a worker shares the CPU with
    the other stages, and spinning threads take cycles from them."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", str(int(spinning)))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda images: session.run(None, {INPUT: images})


def open_openvino(path: Path, threads: int, precision: str | None = "f32") -> Runner:
    """OpenVINO on the CPU in `precision`: f32, because by default the CPU plugin computes in
    bf16 where the CPU has it, about 1e-1 off torch's features (bench/bench_backbone.py shows
    it), which the model's mixtures were not fitted on. None leaves the plugin's default."""
    import openvino as ov

    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = ov.Core().compile_model(str(path), "CPU", config)

    def run(images: np.ndarray) -> list[np.ndarray]:
        result = compiled(images)  # copies the outputs out of the request's buffers
        return [result[output] for output in compiled.outputs]

    return run


@dataclass(frozen=True)
class ExportFormat:
    """One way to export a backbone: its files, the runtime that runs them and its package."""

    name: str  # the --format / GLAD_RUNTIME value
    runtime: str  # what `backbone.runtime` reports
    package: str  # the module the runtime needs (pip extra glad-stream[<name>])
    files: tuple[str, ...]  # the first is what the runtime opens
    open: Callable[[Path, int], Runner]  # (that file, intra-op threads) -> runner

    @property
    def sidecar(self) -> str:
        return f"backbone.{self.name}.json"


FORMATS = {
    "onnx": ExportFormat("onnx", "onnxruntime", "onnxruntime", ("backbone.onnx",),
                         open_onnxruntime),
    "openvino": ExportFormat("openvino", "openvino", "openvino", ("backbone.xml", "backbone.bin"),
                             open_openvino),
}
# Tried in this order when the runtime is "auto": OpenVINO f32 was the faster of the two in every
# run of bench/bench_backbone.py on the 2-core development machine (README, "Faster CPU scoring").
AUTO_ORDER = ("openvino", "onnx")
RUNTIME_CHOICES = ("auto", "torch", *FORMATS)


class ExportedBackbone:
    """A backbone run by an exported runtime, with the torch `Backbone`'s interface: `extract`
    (uint8 (B, S, S, 3) -> float32 (B, d, h, w) tensors per layer), `spec`, `device`, `runtime`."""

    device = torch.device("cpu")

    def __init__(self, spec: BackboneSpec, fmt: ExportFormat, run: Runner, folder: Path,
                 threads: int):
        self.spec = spec
        self.format = fmt
        self.runtime = fmt.runtime
        self.folder = folder  # where its files are (`carry_export` copies them from here)
        self.threads = threads
        self._run = run

    def extract(self, images: np.ndarray) -> list[torch.Tensor]:
        """Features of a batch of uint8 images (B, S, S, 3): one (B, d, h, w) per layer."""
        images = np.ascontiguousarray(check_images(images, self.spec.input_size))
        return [torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))
                for out in self._run(images)]

    def __repr__(self) -> str:
        return f"ExportedBackbone({self.spec.name}, {self.runtime}, {self.folder})"


# --- choosing the runtime on load ---------------------------------------------------------------


def open_backbone(model_dir: Path, spec: BackboneSpec, device: str | torch.device = "cpu",
                  runtime: str | None = None) -> FeatureExtractor:
    """The backbone of the model in `model_dir` on the runtime asked for (`runtime`, else
    $GLAD_RUNTIME, else "auto"), and one log line saying which runtime runs it and why.

    "auto" uses the first export in `AUTO_ORDER` whose runtime is installed, on the CPU, and
    falls back to torch (logging why) when there is none or it does not belong to this model.
    An explicit "onnx" / "openvino" raises instead: `RuntimeUnavailableError`, or
    `ModelMismatchError` / `ModelFileError` for an export of another backbone or a corrupt one.
    """
    choice = runtime or os.environ.get(RUNTIME_ENV) or "auto"
    if choice not in RUNTIME_CHOICES:
        raise RuntimeUnavailableError(
            f"unknown backbone runtime {choice!r} (runtime= or ${RUNTIME_ENV}); choose one of "
            f"{', '.join(RUNTIME_CHOICES)}")
    on_cpu = torch.device(device).type == "cpu"
    backbone: FeatureExtractor | None = None
    if choice in FORMATS:
        if not on_cpu:
            raise RuntimeUnavailableError(
                f"the {choice} backbone runs on the CPU only, not on {device}; use "
                f"{RUNTIME_ENV}=torch (or auto) there")
        backbone = load_exported(model_dir, FORMATS[choice], spec)
        why = f"asked for: {_described(backbone)}"
    elif choice == "torch":
        why = "asked for"
    elif not on_cpu:
        why = f"device {device}: exported runtimes are CPU-only"
    else:
        backbone, why = _first_usable_export(model_dir, spec)
    if backbone is None:
        backbone = backbone_for_spec(spec, device)
    log.info("backbone %s runs on %s (%s)", spec.name, backbone.runtime, why)
    return backbone


def _first_usable_export(model_dir: Path, spec: BackboneSpec) -> tuple[ExportedBackbone | None, str]:
    """The first export in `AUTO_ORDER` that loads, and why it (or none) was chosen."""
    skipped = []
    for name in AUTO_ORDER:
        fmt = FORMATS[name]
        if not (model_dir / fmt.sidecar).is_file():
            continue
        if importlib.util.find_spec(fmt.package) is None:
            skipped.append(f"{fmt.files[0]} found but {fmt.package} is not installed "
                           f"(pip install glad-stream[{name}])")
            continue
        try:
            backbone = load_exported(model_dir, fmt, spec)
        except Exception as error:  # stale, corrupt, or too new for this runtime: torch still works
            log.warning("%s", error if isinstance(error, ModelFileError) else
                        f"{model_dir / fmt.files[0]}: {fmt.package} cannot open it ({error})")
            skipped.append(f"{fmt.files[0]} refused")
            continue
        return backbone, "; ".join([*skipped, _described(backbone)])
    return None, "; ".join(skipped) or f"no exported backbone in {model_dir}"


def _described(backbone: ExportedBackbone) -> str:
    return f"{backbone.folder / backbone.format.files[0]}, {backbone.threads} threads"


def load_exported(model_dir: Path, fmt: ExportFormat, spec: BackboneSpec,
                  threads: int | None = None) -> ExportedBackbone:
    """The export of format `fmt` in `model_dir`, checked against `spec` and its file hashes;
    `threads` intra-op threads (default: torch's, so --threads and torch.set_num_threads hold)."""
    sidecar = read_sidecar(model_dir, fmt)
    expected = spec.preprocessing_hash()
    if sidecar.get("preprocessing_hash") != expected or sidecar.get("input_size") != spec.input_size:
        raise ModelMismatchError(
            f"{model_dir / fmt.sidecar}: exported backbone has preprocessing "
            f"{sidecar.get('preprocessing_hash')} at {sidecar.get('input_size')} px, the model "
            f"needs {expected} at {spec.input_size} px; run 'glad export {model_dir} --format "
            f"{fmt.name}' again")
    if importlib.util.find_spec(fmt.package) is None:
        raise RuntimeUnavailableError(
            f"running the {fmt.name} backbone needs {fmt.package}: pip install glad-stream[{fmt.name}]")
    return _open(model_dir, fmt, spec, threads)


def _open(folder: Path, fmt: ExportFormat, spec: BackboneSpec,
          threads: int | None = None) -> ExportedBackbone:
    """The export of format `fmt` in `folder` on its runtime, unchecked."""
    threads = threads or torch.get_num_threads()
    return ExportedBackbone(spec, fmt, fmt.open(folder / fmt.files[0], threads), folder, threads)


def read_sidecar(model_dir: Path, fmt: ExportFormat) -> dict:
    """The sidecar of `fmt`'s export in `model_dir`, its files present and matching their hashes."""
    file = model_dir / fmt.sidecar
    if not file.is_file():
        raise ModelFileError(f"{model_dir}: no {fmt.name} backbone export ({fmt.sidecar} is "
                             f"missing); run 'glad export {model_dir} --format {fmt.name}'")
    try:
        sidecar = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFileError(f"{file}: corrupt backbone export sidecar ({error})") from None
    if not isinstance(sidecar, dict) or sidecar.get("schema") != SIDECAR_SCHEMA or \
            sidecar.get("format") != fmt.name:
        raise ModelFileError(f"{file}: not a {fmt.name} backbone export sidecar")
    for name in fmt.files:
        path = model_dir / name
        if not path.is_file():
            raise ModelFileError(f"{path}: exported backbone file is missing")
        if file_sha256(path) != sidecar.get("files", {}).get(name):
            raise ModelFileError(f"{path}: content hash does not match {fmt.sidecar} (corrupt or "
                                 f"from another export?)")
    return sidecar


# --- export -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportReport:
    """What `export_model` wrote and how close the export came to torch's features."""

    model: Path
    format: str
    files: tuple[Path, ...]
    sidecar: Path
    preprocessing_hash: str
    max_rel_diff: float
    seconds: float

    def to_dict(self) -> dict:
        return {"model": str(self.model), "format": self.format,
                "files": [str(f) for f in self.files], "sidecar": str(self.sidecar),
                "preprocessing_hash": self.preprocessing_hash, "max_rel_diff": self.max_rel_diff,
                "seconds": round(self.seconds, 2)}


def export_model(model_dir: Path, format_name: str) -> ExportReport:
    """Export the backbone of the model in `model_dir` into that directory (see module doc)."""
    started = time.perf_counter()
    manifest = read_manifest(model_dir)
    spec = BackboneSpec.from_dict(manifest["backbone"])
    backbone = backbone_for_spec(spec, "cpu")
    diff = export_backbone(backbone, model_dir, format_name)
    fmt = FORMATS[format_name]
    return ExportReport(model_dir, format_name, tuple(model_dir / f for f in fmt.files),
                        model_dir / fmt.sidecar, spec.preprocessing_hash(), diff,
                        time.perf_counter() - started)


def export_backbone(backbone: Backbone, folder: Path, format_name: str) -> float:
    """Export a torch `backbone` into `folder` as `format_name`, check that the export gives torch's
    features (within MAX_REL_DIFF), then install its files and sidecar; returns the difference.

    Files are written to a temporary folder first; the old sidecar goes before the new files
    come in and the new sidecar last, so a reader never takes one export's files for another's.
    """
    if format_name not in FORMATS:
        raise RuntimeUnavailableError(f"unknown export format {format_name!r}; choose one of "
                                      f"{', '.join(FORMATS)}")
    fmt = FORMATS[format_name]
    for package in ("onnx", fmt.package):
        if importlib.util.find_spec(package) is None:
            raise RuntimeUnavailableError(
                f"exporting the backbone as {format_name} needs {package}: pip install "
                f"glad-stream[{format_name}]")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".export-") as tmp:
        staging = Path(tmp)
        _to_onnx(backbone, staging / FORMATS["onnx"].files[0])
        if fmt.name == "openvino":
            _onnx_to_openvino(staging / FORMATS["onnx"].files[0], staging / fmt.files[0])
        diff = max_rel_diff(backbone, _open(staging, fmt, backbone.spec))
        if diff > MAX_REL_DIFF:
            raise GladError(f"the {format_name} export of {backbone.spec.name} differs from torch by "
                            f"{diff:.2e} (relative; at most {MAX_REL_DIFF:g} accepted); not installed")
        sidecar = _sidecar(backbone.spec, fmt, staging, diff)
        (folder / fmt.sidecar).unlink(missing_ok=True)
        for name in fmt.files:
            os.replace(staging / name, folder / name)
        (staging / fmt.sidecar).write_text(json.dumps(sidecar, indent=2, sort_keys=True))
        os.replace(staging / fmt.sidecar, folder / fmt.sidecar)
    log.info("exported %s as %s into %s (max relative difference to torch %.1e)",
             backbone.spec.name, format_name, folder, diff)
    return diff


class _Exported(nn.Module):
    """The graph an export holds: uint8 NHWC images -> normalised -> the tapped layers."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.backbone.body(self.backbone.normalize(images)))


def _to_onnx(backbone: Backbone, path: Path) -> None:
    """ONNX opset 17 through torch's TorchScript-based exporter, batch dimension dynamic."""
    example = torch.zeros((2, backbone.spec.input_size, backbone.spec.input_size, 3),
                          dtype=torch.uint8)
    outputs = [f"layer{i + 1}" for i in range(len(backbone.spec.channels))]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notices
        torch.onnx.export(_Exported(backbone).eval(), (example,), str(path), input_names=[INPUT],
                          output_names=outputs, opset_version=OPSET, dynamo=False,
                          dynamic_axes={name: {0: "batch"} for name in (INPUT, *outputs)})
    import onnx

    onnx.checker.check_model(str(path))


def _onnx_to_openvino(source: Path, xml: Path) -> None:
    import openvino as ov

    # Weights kept in f32: save_model compresses them to f16 unless told not to.
    ov.save_model(ov.convert_model(str(source)), str(xml), compress_to_fp16=False)


def max_rel_diff(reference: FeatureExtractor, other: FeatureExtractor,
                 images: np.ndarray | None = None) -> float:
    """Largest difference between two backbones' features relative to the reference's scale
    (max |a - b| / max |a| per layer, the worst layer), on `images` (default: 2 noise images)."""
    if images is None:
        size = reference.spec.input_size
        images = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    diffs = [float((a.cpu() - b.cpu()).abs().max() / a.abs().max().clamp_min(1e-12))
             for a, b in zip(reference.extract(images), other.extract(images), strict=True)]
    return max(diffs)


def _sidecar(spec: BackboneSpec, fmt: ExportFormat, staging: Path, diff: float) -> dict:
    import onnx

    return {
        "schema": SIDECAR_SCHEMA,
        "format": fmt.name,
        "runtime": fmt.runtime,
        "files": {name: file_sha256(staging / name) for name in fmt.files},
        "backbone": spec.to_dict(),
        "preprocessing_hash": spec.preprocessing_hash(),
        "input_size": spec.input_size,
        "input": {"name": INPUT, "dtype": "uint8", "layout": "NHWC", "normalised": "inside"},
        "outputs": [f"layer{i + 1}" for i in range(len(spec.channels))],
        "opset": OPSET,
        "max_rel_diff_vs_torch": diff,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                     fmt.package: _version(fmt.package)},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


# --- keeping an export with saved copies of a model ---------------------------------------------


def carry_export(backbone: FeatureExtractor, target: Path) -> None:
    """Copy the export `backbone` runs from into `target` (a model being saved from a loaded one,
    e.g. the online updater's next version), so that version runs on the same runtime."""
    if not isinstance(backbone, ExportedBackbone) or backbone.folder.resolve() == target.resolve():
        return
    fmt = backbone.format
    if not (backbone.folder / fmt.sidecar).is_file():
        return
    with tempfile.TemporaryDirectory(dir=target, prefix=".export-") as tmp:
        for name in (*fmt.files, fmt.sidecar):
            shutil.copy2(backbone.folder / name, Path(tmp) / name)
        (target / fmt.sidecar).unlink(missing_ok=True)
        for name in (*fmt.files, fmt.sidecar):
            os.replace(Path(tmp) / name, target / name)


def file_sha256(file: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (model arrays and exported backbones)."""
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
