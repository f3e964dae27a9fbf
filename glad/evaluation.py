"""Evaluation on MVTec-layout data: GLAD and the baselines side by side (spec §8.2, Table 2 layout).

Pixel metrics are computed at the model input size (256x256) in the frame of the test image:
ground-truth masks are resized with nearest interpolation; GLAD's heat maps come back from the
reference frame by the inverse alignment warp (spec §6.6).

Randomized pose (paper Table 4, spec §8.3): `randomize_seeds` adds, per object category and seed,
a copy whose train and test images (and masks, identically) get a random rotation and shift.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

from glad.align import random_pose
from glad.backbones import Backbone, create_backbone
from glad.baselines import MahaAD, PaDiM
from glad.datasets import MVTecCategory, read_mask
from glad.detector import Detector
from glad.images import read_image, resize_square
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
    randomize_seed: int | None = None

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


@dataclass
class CategoryData:
    """One category in memory at the input size: training images, test images, labels, masks."""

    name: str
    is_texture: bool
    train: list[np.ndarray]
    test: list[np.ndarray]
    labels: np.ndarray
    masks: np.ndarray  # bool (N, S, S)
    has_masks: bool


def load_category(category: MVTecCategory, size: int) -> CategoryData:
    """Read a category folder, resizing every image and mask to size x size."""
    items = category.test_items()
    return CategoryData(
        name=category.name,
        is_texture=category.is_texture,
        train=[resize_square(read_image(p), size) for p in category.train_paths()],
        test=[resize_square(read_image(item.path), size) for item in items],
        labels=np.array([item.label for item in items]),
        masks=np.stack([read_mask(item.mask_path, (size, size)) for item in items]),
        has_masks=any(item.mask_path is not None for item in items),
    )


def randomized(data: CategoryData, seed: int) -> CategoryData:
    """A copy with a random pose per image (rotation within ±10°, shift within ±16 px at 256)."""
    rng = np.random.default_rng(seed)
    train = [random_pose(image, None, rng)[0] for image in data.train]
    moved = [random_pose(image, mask, rng) for image, mask in zip(data.test, data.masks, strict=True)]
    return replace(data, train=train, test=[image for image, _ in moved],
                   masks=np.stack([mask for _, mask in moved]))


def evaluate_category(
    data: CategoryData, methods: Sequence[str], backbone: Backbone, progress: bool = False,
    on_record: Callable[[EvalRecord], None] | None = None, glad_params: dict | None = None,
    randomize_seed: int | None = None,
) -> list[EvalRecord]:
    """Fit every method on the training images and score the test images; one record per method.

    When both "glad" and "glad-global" are asked for, the global ablation reuses GLAD's mixtures
    (listed after "glad" in `methods`) and reports the same fit time.
    """
    train, test, labels, masks = data.train, data.test, data.labels, data.masks
    records = []
    fitted: dict[str, tuple[Detector, float]] = {}
    for method in methods:
        if method == "glad-global" and "glad" in fitted:
            # The paper's ablation: the same mixtures with pi_k(x) = pi_k; no second fit.
            glad, fit_s = fitted["glad"]
            detector = glad.without_local_weights()
        else:
            detector = make_detector(method, backbone, data.is_texture, progress, glad_params)
            started = time.perf_counter()
            detector.fit(train)
            fit_s = time.perf_counter() - started
        fitted[method] = (detector, fit_s)
        started = time.perf_counter()
        result = detector.score(test)
        score_ms = 1000.0 * (time.perf_counter() - started) / len(test)
        localizes = method != "mahaad" and data.has_masks
        record = EvalRecord(
            category=data.name,
            method=method,
            image_auroc=image_auroc(labels, result.scores),
            pixel_auroc=pixel_auroc(masks, result.heatmaps) if localizes else None,
            au_pro=au_pro(masks, result.heatmaps) if localizes else None,
            fit_s=fit_s,
            score_ms=score_ms,
            model_mb=detector.model_bytes() / 1e6,
            randomize_seed=randomize_seed,
        )
        log.info("%s / %s (randomize %s): image AUROC %.3f", data.name, method, randomize_seed,
                 record.image_auroc)
        if on_record is not None:
            on_record(record)
        records.append(record)
    return records


def evaluate(
    categories: Sequence[MVTecCategory], methods: Sequence[str] = METHODS,
    backbone: str = "efficientnet_lite0", weights: str = "pretrained", device: str = "cpu",
    progress: bool = False, on_record: Callable[[EvalRecord], None] | None = None,
    glad_params: dict | None = None, randomize_seeds: Sequence[int] = (),
) -> list[EvalRecord]:
    """Evaluate `methods` on every category with one shared backbone; with `randomize_seeds`,
    also on a randomized-pose copy of each object category per seed."""
    built = create_backbone(backbone, weights, device=device)
    records = []
    for category in categories:
        data = load_category(category, built.spec.input_size)
        records += evaluate_category(data, methods, built, progress, on_record, glad_params)
        for seed in () if data.is_texture else randomize_seeds:
            records += evaluate_category(randomized(data, seed), methods, built, progress,
                                         on_record, glad_params, seed)
    return records


def format_table(records: Sequence[EvalRecord]) -> str:
    """Paper-style tables: image AUROC (%) per category x method, then pixel AUROC, then cost;
    with randomized copies, a last table of normal vs randomized AUROC and the drop (Table 4)."""
    robustness = robustness_table(records)
    records = [r for r in records if r.randomize_seed is None]
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
        blocks.append(_render(title, ["category", *methods], rows, ["mean", *means]))
    if robustness:
        blocks.append(robustness)
    return "\n\n".join(blocks)


def robustness_summary(records: Sequence[EvalRecord]) -> dict[str, tuple[float, float, float]]:
    """Per method: mean image AUROC (%) on the original and on the randomized copies of the
    categories that have randomized copies (over categories and seeds), and the drop."""
    randomized_records = [r for r in records if r.randomize_seed is not None]
    categories = {r.category for r in randomized_records}
    summary = {}
    for method in dict.fromkeys(r.method for r in randomized_records):
        normal = [r.image_auroc for r in records if r.method == method
                  and r.category in categories and r.randomize_seed is None]
        moved = [r.image_auroc for r in randomized_records if r.method == method]
        summary[method] = (100.0 * np.mean(normal), 100.0 * np.mean(moved),
                           100.0 * (np.mean(normal) - np.mean(moved)))
    return summary


def robustness_table(records: Sequence[EvalRecord]) -> str:
    """The randomized-pose table (paper Table 4 layout); "" without randomized records."""
    summary = robustness_summary(records)
    if not summary:
        return ""
    randomized_records = [r for r in records if r.randomize_seed is not None]
    categories = sorted({r.category for r in randomized_records})
    seeds = sorted({r.randomize_seed for r in randomized_records})
    rows = [[method, f"{normal:.1f}", f"{moved:.1f}", f"{drop:.1f}"]
            for method, (normal, moved, drop) in summary.items()]
    title = f"randomized pose: image AUROC (%) over {', '.join(categories)} x seeds {seeds}"
    return _render(title, ["method", "normal", "randomized", "drop"], rows)


def _render(title: str, header: list[str], rows: list[list[str]],
            footer: list[str] | None = None) -> str:
    every = [header, *rows, *([footer] if footer else [])]
    widths = [max(len(str(row[i])) for row in every) for i in range(len(header))]
    line = lambda cells: "  ".join(  # noqa: E731
        str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(
            zip(cells, widths, strict=True)))
    rule = "-" * len(line(header))
    tail = [rule, line(footer)] if footer else []
    return "\n".join([title, rule, line(header), rule, *map(line, rows), *tail])
