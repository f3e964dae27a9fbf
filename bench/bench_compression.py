"""Compressed frames on real categories (MVTec layout): does a model fitted on lossless training
images still score normal parts as normal when the line's frames arrive JPEG-compressed?

Per category, GLAD with its defaults (the acquisition noise floor, `glad fit --jpeg-noise 95`),
GLAD without the floor (`--jpeg-noise 0`) and PaDiM fit on the training images as they are,
as `glad eval` makes them. Each
scores the test set as it is and re-encoded as JPEG at each `--qualities` (a camera's MJPEG, a
video stream, the line's own JPEG transport at 95): image AUROC, and for GLAD the false alarms
on the good test images at its calibrated threshold.

Targets, per category: GLAD's image AUROC on JPEG copies at quality 75 or better stays within
1 point of its AUROC on the originals, and its false alarms on those copies are no more than on
the originals plus one image. One table for all categories, then the targets as PASS/FAIL lines.

    python3 bench/bench_compression.py                          # every category of ../shared/realdata
    python3 bench/bench_compression.py ../shared/realdata/bottle --qualities 95 90 75 50
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_online_real import REALDATA, categories, print_targets  # noqa: E402
from glad.backbones import create_backbone  # noqa: E402
from glad.datasets import MVTecCategory  # noqa: E402
from glad.evaluation import load_category, make_detector  # noqa: E402
from glad.images import as_rgb, jpeg_round_trip  # noqa: E402
from glad.metrics import image_auroc  # noqa: E402
from glad.model import GladModel  # noqa: E402

AUROC_SLACK = 1.0  # points GLAD may lose on JPEG copies at TARGET_QUALITY or better
TARGET_QUALITY = 75
METHODS = ("glad", "glad, no floor", "padim")


def run_category(folder: Path, qualities: list[int], backbone) -> dict:
    """Per method, image AUROC and false alarms on the originals and on each JPEG quality."""
    data = load_category(MVTecCategory(folder), backbone.spec.input_size)
    versions = {"original": data.test} | {
        f"q{q}": [jpeg_round_trip(as_rgb(image), q) for image in data.test] for q in qualities}
    good = data.labels == 0
    texture = data.is_texture
    models = {"glad": make_detector("glad", backbone, texture, False),
              "glad, no floor": make_detector("glad", backbone, texture, False, {"jpeg_noise": 0}),
              "padim": make_detector("padim", backbone, texture, False)}
    rows = {}
    for name, model in models.items():
        model.fit(data.train)
        row = {}
        for version, images in versions.items():
            scores = model.score(images).scores
            row[version] = {"auroc": 100 * image_auroc(data.labels, scores)}
            if isinstance(model, GladModel):
                row[version]["false_alarms"] = int(model.decide(scores)[good].sum())
        rows[name] = row
    return {"category": folder.name, "good": int(good.sum()), "rows": rows}


def targets(result: dict, qualities: list[int]) -> dict[str, bool]:
    glad = result["rows"]["glad"]
    kept = [q for q in qualities if q >= TARGET_QUALITY]
    return {f"AUROC on JPEG q{q} within {AUROC_SLACK:g} of the originals":
            glad[f"q{q}"]["auroc"] >= glad["original"]["auroc"] - AUROC_SLACK for q in kept} | {
            f"false alarms on JPEG q{q} at most the originals' + 1":
            glad[f"q{q}"]["false_alarms"] <= glad["original"]["false_alarms"] + 1 for q in kept}


def print_table(results: list[dict], qualities: list[int]) -> None:
    versions = ["original"] + [f"q{q}" for q in qualities]
    print("image AUROC (%), false alarms on the good test images for GLAD")
    print(f"{'category':18} {'method':15} " + " ".join(f"{v:>13}" for v in versions))
    for result in results:
        for method, row in result["rows"].items():
            cells = []
            for version in versions:
                cell = f"{row[version]['auroc']:.1f}"
                if "false_alarms" in row[version]:
                    cell += f" ({row[version]['false_alarms']}/{result['good']})"
                cells.append(f"{cell:>13}")
            print(f"{result['category']:18} {method:15} " + " ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", type=Path, nargs="?", default=REALDATA,
                        help="one category folder or a folder of categories "
                             "(default ../shared/realdata)")
    parser.add_argument("--qualities", type=int, nargs="+", default=[95, 90, 75],
                        help="JPEG qualities the test images are re-encoded at (default 95 90 75)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backbone = create_backbone("efficientnet_lite0")
    results = []
    for folder in categories(args.data):
        print(f"{folder.name} ...", file=sys.stderr, flush=True)
        results.append(run_category(folder, args.qualities, backbone))
    print_table(results, args.qualities)
    print_targets(results, lambda result: targets(result, args.qualities), args.json)


if __name__ == "__main__":
    main()
