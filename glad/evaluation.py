"""Evaluation on MVTec-layout data: GLAD and the baselines side by side (spec §8.2, Table 2 layout).

Pixel metrics are computed at the model input size (256x256): ground-truth masks are resized with
nearest interpolation, heat maps are used as the detectors produce them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from glad.backbones import Backbone, create_backbone
from glad.baselines import MahaAD, PaDiM
from glad.datasets import MVTecCategory, read_mask
from glad.detector import Detector
from glad.images import read_image
from glad.metrics import au_pro, image_auroc, pixel_auroc
from glad.model import GladModel

log = logging.getLogger(__name__)

METHODS = ("glad", "glad-global", "padim", "mahaad")


@dataclass
class EvalRecord:
    """One (category, method) result; AUROCs in [0, 1], None where undefined (no masks)."""

    category: str
    method: str
    image_auroc: float
    pixel_auroc: float | None
    au_pro: float | None
    fit_s: float
    score_ms: float
    model_mb: float

    def to_dict(self) -> dict:
        return asdict(self)


def make_detector(method: str, backbone: Backbone, texture: bool, progress: bool,
                  glad_params: dict | None = None) -> Detector:
    """A fresh, unfitted detector for `method` sharing the already-built `backbone`.

    `glad_params` are extra `GladModel` parameters (e.g. a smaller fit budget).
    """
    roi = "margin" if texture else "full"
    if method in ("glad", "glad-global"):
        return GladModel(backbone=backbone, roi=roi, local=method == "glad", progress=progress,
                         **(glad_params or {}))
    if method == "padim":
        return PaDiM(backbone=backbone, progress=progress)
    if method == "mahaad":
        return MahaAD(backbone=backbone, progress=progress)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def evaluate_category(
    category: MVTecCategory, methods: Sequence[str], backbone: Backbone, progress: bool = False,
    on_record: Callable[[EvalRecord], None] | None = None, glad_params: dict | None = None,
) -> list[EvalRecord]:
    """Fit every method on train/good and score test/*; one record per method.

    When both "glad" and "glad-global" are asked for, the global ablation reuses GLAD's mixtures
    (listed after "glad" in `methods`) and reports the same fit time.
    """
    train = [read_image(p) for p in category.train_paths()]
    items = category.test_items()
    test = [read_image(item.path) for item in items]
    labels = np.array([item.label for item in items])
    size = backbone.spec.input_size
    masks = np.stack([read_mask(item.mask_path, (size, size)) for item in items])
    has_masks = any(item.mask_path is not None for item in items)
    records = []
    fitted: dict[str, tuple[Detector, float]] = {}
    for method in methods:
        if method == "glad-global" and "glad" in fitted:
            # The paper's ablation: the same mixtures with pi_k(x) = pi_k; no second fit.
            glad, fit_s = fitted["glad"]
            detector = glad.without_local_weights()
        else:
            detector = make_detector(method, backbone, category.is_texture, progress, glad_params)
            started = time.perf_counter()
            detector.fit(train)
            fit_s = time.perf_counter() - started
        fitted[method] = (detector, fit_s)
        started = time.perf_counter()
        result = detector.score(test)
        score_ms = 1000.0 * (time.perf_counter() - started) / len(test)
        localizes = method != "mahaad" and has_masks
        record = EvalRecord(
            category=category.name,
            method=method,
            image_auroc=image_auroc(labels, result.scores),
            pixel_auroc=pixel_auroc(masks, result.heatmaps) if localizes else None,
            au_pro=au_pro(masks, result.heatmaps) if localizes else None,
            fit_s=fit_s,
            score_ms=score_ms,
            model_mb=detector.model_bytes() / 1e6,
        )
        log.info("%s / %s: image AUROC %.3f", category.name, method, record.image_auroc)
        if on_record is not None:
            on_record(record)
        records.append(record)
    return records


def evaluate(
    categories: Sequence[MVTecCategory], methods: Sequence[str] = METHODS,
    backbone: str = "efficientnet_lite0", weights: str = "pretrained", device: str = "cpu",
    progress: bool = False, on_record: Callable[[EvalRecord], None] | None = None,
    glad_params: dict | None = None,
) -> list[EvalRecord]:
    """Evaluate `methods` on every category with one shared backbone."""
    built = create_backbone(backbone, weights, device=device)
    records = []
    for category in categories:
        records += evaluate_category(category, methods, built, progress, on_record, glad_params)
    return records


def format_table(records: Sequence[EvalRecord]) -> str:
    """Paper-style tables: image AUROC (%) per category x method, then pixel AUROC, then cost."""
    methods = list(dict.fromkeys(r.method for r in records))
    categories = list(dict.fromkeys(r.category for r in records))
    by_key = {(r.category, r.method): r for r in records}
    blocks = []
    for title, field, scale, fmt in (
        ("image AUROC (%)", "image_auroc", 100.0, "{:.1f}"),
        ("pixel AUROC (%)", "pixel_auroc", 100.0, "{:.1f}"),
        ("AU-PRO (%)", "au_pro", 100.0, "{:.1f}"),
        ("fit (s)", "fit_s", 1.0, "{:.1f}"),
        ("score (ms/image)", "score_ms", 1.0, "{:.0f}"),
        ("model (MB)", "model_mb", 1.0, "{:.2f}"),
    ):
        rows = []
        for category in categories:
            cells = []
            for method in methods:
                record = by_key.get((category, method))
                value = None if record is None else getattr(record, field)
                cells.append("-" if value is None else fmt.format(value * scale))
            rows.append([category, *cells])
        means = []
        for method in methods:
            values = [getattr(by_key[(c, method)], field) for c in categories
                      if (c, method) in by_key and getattr(by_key[(c, method)], field) is not None]
            means.append(fmt.format(np.mean(values) * scale) if values else "-")
        rows.append(["mean", *means])
        blocks.append(_render(title, ["category", *methods], rows))
    return "\n\n".join(blocks)


def _render(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(  # noqa: E731
        str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(
            zip(cells, widths, strict=True)))
    rule = "-" * len(line(header))
    return "\n".join([title, rule, line(header), rule, *map(line, rows[:-1]), rule,
                      line(rows[-1])])
