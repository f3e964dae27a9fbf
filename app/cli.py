"""The `glad` command: fit, score, evaluate and synthesise data; the streaming commands (run,
stage, status, models) live in `app.line_commands`.

Every failure a user can cause prints one line, `glad: error: ...`, and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

import cv2

from app.dashboard_command import add_command as add_dashboard_command
from app.line_commands import add_commands
from app.updater_command import add_command as add_updater_command
from glad.errors import GladError
from glad.images import LINE_JPEG_QUALITY, MAX_PIXELS, MAX_PIXELS_ENV, pixel_limit

EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # our error lines name broken image files; OpenCV's own warnings about them are noise
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    if args.max_pixels is not None:  # through the environment, so child workers see it too
        os.environ[MAX_PIXELS_ENV] = str(args.max_pixels)
    try:
        pixel_limit()  # a bad value is one error line, before any work
        return args.handler(args) or 0
    except GladError as error:
        print(f"glad: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("glad: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glad",
        description="glad-stream: industrial visual inspection with GLAD (Global-to-Local "
                    "Anomaly Detector). Learns normal parts from normal images only; flags "
                    "defective parts with a score and a heat map.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens (INFO)")
    parser.add_argument("--max-pixels", type=int, default=None, metavar="N",
                        help="refuse images larger than N pixels before decoding them (default: "
                             f"${MAX_PIXELS_ENV} or {MAX_PIXELS:,}); workers started by "
                             "`glad run` inherit it")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_synth(commands)
    _add_fit(commands)
    _add_score(commands)
    _add_eval(commands)
    _add_export(commands)
    add_commands(commands)
    add_updater_command(commands)
    add_dashboard_command(commands)
    return parser


def _progress(args) -> bool:
    return not args.json and sys.stderr.isatty()


BACKBONE_NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18",
                  "wide_resnet50_2")  # glad.backbones.BACKBONES


def _add_backbone_options(parser: argparse.ArgumentParser, several: bool = False) -> None:
    if several:
        parser.add_argument("--backbone", default=[BACKBONE_NAMES[0]], type=_backbone_list,
                            help="feature extractor (default: %(default)s, weights ship "
                                 "offline); several, comma-separated: each is fitted and the one "
                                 f"whose held-back normals and canaries separate best is kept "
                                 f"({', '.join(BACKBONE_NAMES)})")
    else:
        parser.add_argument("--backbone", default=BACKBONE_NAMES[0], choices=BACKBONE_NAMES,
                            help="feature extractor (default: %(default)s, weights ship offline)")
    parser.add_argument("--weights", default="pretrained",
                        help="'pretrained' (shipped package or torch cache), 'random', or a "
                             "weights file path")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def _backbone_list(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in BACKBONE_NAMES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown backbone {', '.join(map(repr, unknown or [value]))}; choose from "
            f"{', '.join(BACKBONE_NAMES)}")
    return list(dict.fromkeys(names))


# --- synth --------------------------------------------------------------------------------------


def _add_synth(commands) -> None:
    from glad.synth import CATEGORIES, PRESETS

    parser = commands.add_parser(
        "synth", help="write a synthetic inspection dataset in MVTec layout",
        description="Render synthetic parts (objects and a texture) with realistic defects and "
                    "exact masks, in MVTec AD layout. Deterministic by --seed.")
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small",
                        help="dataset size (default: %(default)s; 'tiny' is for tests)")
    parser.add_argument("--categories", nargs="+", choices=sorted(CATEGORIES),
                        help="categories to write (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the folders written as JSON")
    parser.set_defaults(handler=_synth)


def _synth(args) -> int:
    from glad.synth import PRESETS, generate_dataset

    folders = generate_dataset(args.out, args.categories, PRESETS[args.preset], args.seed,
                               progress=_progress(args))
    if args.json:
        print(json.dumps({"categories": [str(f) for f in folders]}))
    else:
        for folder in folders:
            print(f"wrote {folder}")
    return 0


# --- fit ----------------------------------------------------------------------------------------


def _add_fit(commands) -> None:
    parser = commands.add_parser(
        "fit", help="fit a GLAD model on normal images",
        description="Fit a GLAD model on normal images: a folder of images, or an MVTec "
                    "category folder (its train/good is used).")
    parser.add_argument("data", type=Path, help="image folder or MVTec category folder")
    parser.add_argument("--out", type=Path, required=True, help="model directory to write")
    _add_backbone_options(parser, several=True)
    parser.add_argument("--texture", action="store_true",
                        help="texture product: ignore a 1/16 margin on each side")
    parser.add_argument("--roi", default=None,
                        help="region of interest: 'full' (objects' default), 'margin' (textures' "
                             "default), 'auto' (the part found in the reference image), a mask "
                             "image (white = inspect), or a polygon 'x,y x,y x,y ...' in 256x256 "
                             "reference pixels")
    parser.add_argument("--components", default="auto",
                        help="Gaussians to start K-MLE from per layer, or 'auto' (default)")
    parser.add_argument("--radius", default="auto",
                        help="localisation radius in cells, or 'auto' (chosen on held-back "
                             "normal images; may pick the global mixture)")
    parser.add_argument("--global-only", action="store_true",
                        help="no local weights (the paper's global ablation)")
    parser.add_argument("--align", action=argparse.BooleanOptionalAction, default=None,
                        help="register images on a reference training image (default: on for "
                             "objects, off for textures)")
    parser.add_argument("--motion", default="euclidean",
                        choices=("translation", "euclidean", "similarity", "affine", "homography"),
                        help="alignment motion model (default: %(default)s)")
    parser.add_argument("--mixture", choices=("kmle", "em"), default="kmle")
    parser.add_argument("--far", type=float, default=0.005,
                        help="false alarms per normal part the threshold is calibrated to, on "
                             "held-back normal images (default: %(default)s)")
    parser.add_argument("--select", choices=("on", "off"), default="on",
                        help="on: choose the localisation radius by how well held-back normals "
                             "and synthetic defects pasted on them separate (default); off: by "
                             "the lowest held-back normal score (the former rule)")
    parser.add_argument("--jpeg-noise", type=_jpeg_quality, default=LINE_JPEG_QUALITY,
                        metavar="QUALITY",
                        help="no Gaussian is narrower than the feature change of a JPEG round "
                             "trip at this quality, measured on the training images, so frames "
                             "that a camera, a video stream or the line's JPEG transport "
                             "compressed score as their originals (default: %(default)s; 0: off)")
    _add_fit_budget_options(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    parser.set_defaults(handler=_fit)


def _add_fit_budget_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-components", type=int, default=256,
                        help="upper bound on Gaussians per layer (default: %(default)s)")
    parser.add_argument("--max-iter", type=int, default=30,
                        help="K-MLE iterations at most (default: %(default)s)")


def _fit(args) -> int:
    from glad.datasets import TEXTURE_CATEGORIES, image_folder
    from glad.images import read_image
    from glad.model import fit_best_backbone

    folder = args.data / "train" / "good" if (args.data / "train" / "good").is_dir() else args.data
    paths = image_folder(folder)
    images = [read_image(p) for p in paths]
    texture = args.texture or args.data.name in TEXTURE_CATEGORIES
    model = fit_best_backbone(
        images, args.backbone, weights=args.weights, device=args.device,
        n_components=_int_or_auto(args.components, "--components"),
        radius=_int_or_auto(args.radius, "--radius"), local=not args.global_only,
        mixture=args.mixture, roi=_roi(args.roi, texture), seed=args.seed,
        max_components=args.max_components, max_iter=args.max_iter,
        align="auto" if args.align is None else args.align, motion=args.motion,
        far=_rate(args.far, "--far"), select=args.select == "on", jpeg_noise=args.jpeg_noise,
        progress=_progress(args),
    )
    model.save(args.out)
    summary = {
        "model": str(args.out),
        "images": len(images),
        "backbone": model.backbone_.spec.name,
        "components": [layer.mixture.n_components for layer in model.layers_],
        "radius": model.radius_,
        "aligned": model.reference_ is not None,
        "threshold": model.threshold_,
        "calibration": model.calibration_.to_dict(),
        "validation": model.validation_.to_dict(),
        "selection": model.selection_,
        "jpeg_noise": model.jpeg_noise,
        "fit_s": round(model.fit_seconds_, 2),
        "model_mb": round(model.model_bytes() / 1e6, 3),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        from glad.validation import format_selection, format_validation

        print(f"fitted on {len(images)} images in {summary['fit_s']} s: {summary['backbone']}, "
              f"{'aligned' if summary['aligned'] else 'not aligned'}, K per layer "
              f"{summary['components']}, radius {model.radius_ or 'global'}, threshold "
              f"{model.threshold_:.2f}, {summary['model_mb']} MB -> {args.out}")
        print(format_validation(summary["calibration"], summary["validation"]))
        if model.selection_:
            print("chosen on held-back normal images and synthetic defects pasted on them:")
            print(format_selection(model.selection_))
    return 0


def _jpeg_quality(value: str) -> int:
    if not value.isdigit() or int(value) > 100:
        raise argparse.ArgumentTypeError(f"a JPEG quality is 1-100 (0: off), got {value!r}")
    return int(value)


def _rate(value: float, flag: str) -> float:
    if not 0.0 < value < 1.0:
        raise GladError(f"{flag}: a false-alarm rate lies strictly between 0 and 1, got {value}")
    return value


def _int_or_auto(value: str, flag: str) -> int | str:
    if value == "auto":
        return value
    try:
        number = int(value)
    except ValueError:
        raise GladError(f"{flag} must be an integer or 'auto', got {value!r}") from None
    if number < 1:
        raise GladError(f"{flag} must be at least 1, got {number}")
    return number


def _roi(value: str | None, texture: bool):
    if value is None:
        return "margin" if texture else "full"
    if value in ("full", "margin", "auto"):
        return value
    if "," in value and not Path(value).exists():
        try:
            points = [tuple(float(c) for c in point.split(",")) for point in value.split()]
        except ValueError:
            points = []
        if len(points) < 3 or any(len(p) != 2 for p in points):
            raise GladError(f"--roi polygon needs at least 3 'x,y' points, got {value!r}")
        return points
    from glad.images import read_image, resize_square

    return resize_square(read_image(value), 256)[:, :, 0] > 127


# --- score --------------------------------------------------------------------------------------


def _add_score(commands) -> None:
    parser = commands.add_parser(
        "score", help="score images with a fitted model",
        description="Score images (files or folders) with a fitted model: one line per image "
                    "with its score and decision; optional heat-map overlays as PNG.")
    parser.add_argument("model", type=Path, help="model directory written by 'glad fit'")
    parser.add_argument("images", type=Path, nargs="+", help="image files or folders")
    parser.add_argument("--heatmaps", type=Path, help="write heat-map overlays (PNG) here")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_score)


def _score(args) -> int:
    """Scores every readable image; unreadable ones (corrupt, truncated, missing) get a row with
    their reason and no verdict, and the command ends with one error line and exit status 2."""
    from glad.datasets import image_folder
    from glad.errors import ImageError
    from glad.heatmap import save_overlay
    from glad.images import read_image
    from glad.model import GladModel

    model = GladModel.load(args.model, device=args.device)
    model.progress = _progress(args)
    paths = []
    for item in args.images:
        paths += image_folder(item) if item.is_dir() else [item]
    images, problems = [], {}  # problems: unreadable path -> why
    for path in paths:
        try:
            images.append(read_image(path))
        except ImageError as error:
            problems[path] = str(error)
    result = model.score(images)
    anomalous = model.decide(result.scores)
    rows, at = [], 0  # at: the next readable image's row in `result`
    for index, path in enumerate(paths):
        if path in problems:
            rows.append({"image": str(path), "score": None, "anomalous": None,
                         "status": f"unreadable: {problems[path]}"})
            continue
        score = float(result.scores[at])
        row = {"image": str(path), "score": score if math.isfinite(score) else None,
               "anomalous": bool(anomalous[at]), "status": result.status[at]}
        if args.heatmaps:
            row["heatmap"] = str(save_overlay(args.heatmaps / f"{index:04d}_{path.stem}.png",
                                              images[at], result.heatmaps[at], model.threshold_))
        rows.append(row)
        at += 1
    if args.json:
        print(json.dumps({"model": str(args.model), "threshold": model.threshold_,
                          "results": rows}))
    else:
        for row in rows:
            verdict = {True: "ANOMALOUS", False: "normal", None: "UNREADABLE"}[row["anomalous"]]
            score = "-" if row["score"] is None else f"{row['score']:.3f}"
            note = "" if row["status"] == "ok" else f"  ({row['status']})"
            print(f"{score:>10s}  {verdict:9s}  {row['image']}{note}")
        print(f"threshold {model.threshold_:.3f}: {int(anomalous.sum())} of {len(images)} "
              "anomalous")
    if problems:
        first = next(iter(problems.values()))
        raise ImageError(f"{len(problems)} of {len(paths)} images could not be read and have no "
                         f"verdict (first: {first})")
    return 0


# --- eval ---------------------------------------------------------------------------------------


def _add_eval(commands) -> None:
    parser = commands.add_parser(
        "eval", help="evaluate GLAD and baselines on MVTec-layout data",
        description="Fit each method on <category>/train/good and score <category>/test: image "
                    "AUROC, pixel AUROC and AU-PRO (at 256x256), fit seconds, score ms/image, "
                    "model MB, as tables laid out like the GLAD paper's Table 2.")
    parser.add_argument("root", type=Path, help="dataset root (or one category folder)")
    parser.add_argument("--categories", nargs="+", help="categories to evaluate (default: all)")
    parser.add_argument("--methods", default="glad,glad-global,padim,mahaad",
                        help="comma-separated methods among glad, glad-global (no local "
                             "weights), padim, mahaad (default: %(default)s)")
    _add_backbone_options(parser)
    _add_fit_budget_options(parser)
    parser.add_argument("--randomize", type=int, nargs="+", default=[], metavar="SEED",
                        help="also evaluate a randomized-pose copy of each object category per "
                             "seed (rotation ±10°, shift ±16 px; paper Table 4)")
    parser.add_argument("--json", action="store_true",
                        help='print {"results": [{category, method, image_auroc, ..., '
                             'randomize_seed}]}')
    parser.set_defaults(handler=_eval)


def _eval(args) -> int:
    from glad.datasets import find_categories
    from glad.evaluation import METHODS, evaluate, format_table

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise GladError(f"unknown methods {unknown or args.methods!r}; choose from "
                        f"{', '.join(METHODS)}")
    categories = find_categories(args.root, args.categories)

    def report(record) -> None:
        if not args.json:
            seed = "" if record.randomize_seed is None else f" (randomized, seed {record.randomize_seed})"
            print(f"  {record.category:20s} {record.method:12s} image AUROC "
                  f"{record.image_auroc:.3f}{seed}", file=sys.stderr)

    glad_params = {"max_components": args.max_components, "max_iter": args.max_iter}
    records = evaluate(categories, methods, args.backbone, args.weights, args.device,
                       progress=_progress(args), on_record=report, glad_params=glad_params,
                       randomize_seeds=args.randomize)
    if args.json:
        print(json.dumps({"results": [r.to_dict() for r in records]}))
    else:
        print(format_table(records))
    return 0


# --- export -------------------------------------------------------------------------------------


def _add_export(commands) -> None:
    parser = commands.add_parser(
        "export", help="export a model's backbone to ONNX Runtime or OpenVINO (faster on CPU)",
        description="Export the backbone of a fitted model (the layers GLAD taps, preprocessing "
                    "included, any batch size) into the model directory, with a sidecar "
                    "backbone.FORMAT.json recording the preprocessing hash, input size and file "
                    "hashes. Loading the model then runs the backbone on that runtime on CPU "
                    "when it is installed (pip install glad-stream[onnx] or [openvino]), and on "
                    "torch otherwise; GLAD_RUNTIME=auto|torch|onnx|openvino overrides the "
                    "choice. The export is checked against torch's features before it is "
                    "installed. Exporting needs the onnx package. Published versions copy the "
                    "whole model directory, so export before 'glad models publish', or export "
                    "a published version's directory in place.")
    parser.add_argument("model", type=Path, help="model directory written by 'glad fit'")
    parser.add_argument("--format", choices=("onnx", "openvino"), default="openvino",
                        help="openvino (OpenVINO, f32; the faster one on the development CPU) or "
                             "onnx (ONNX Runtime); with both exported, loading prefers openvino "
                             "(default: %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help='print {"model", "format", "files", "sidecar", '
                             '"preprocessing_hash", "max_rel_diff", "seconds"}')
    parser.set_defaults(handler=_export)


def _export(args) -> int:
    from glad.runtime import export_model

    report = export_model(args.model, args.format)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(f"exported {args.format} backbone ({', '.join(f.name for f in report.files)}, "
              f"max relative difference to torch {report.max_rel_diff:.1e}) -> {args.model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
