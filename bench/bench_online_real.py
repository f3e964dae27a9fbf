"""Online learning on real categories (MVTec layout): does learning confirmed normals online
keep or improve detection, against the model frozen after its first images and a full refit?

Per category, the training images are shuffled (seed 0); the base model fits on the first
`--fit-share` of them and the rest are confirmed normal and go through what `glad updater` does
with them: every 4th is held back with a canary defect pasted on it, the others are learned with
online K-MLE in batches of 8, and the gate decides and sets the threshold. The refit learns the
same images from scratch. All three models score the category's whole test set: image AUROC,
false-alarm rate on its good images and recall on its defects at each model's own threshold.

Targets (issue 12, item 4), per category: the online candidate passes the gate, lands within
1 AUROC point of the refit, and its recall at its threshold is at least the frozen model's.
One table for all categories, then the targets as PASS/FAIL lines.

    python3 bench/bench_online_real.py                      # every category of ../shared/realdata
    python3 bench/bench_online_real.py ../shared/realdata/bottle --fit-share 0.25
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_online import updater_candidate  # noqa: E402
from glad.datasets import MVTecCategory  # noqa: E402
from glad.images import read_image  # noqa: E402
from glad.metrics import image_auroc  # noqa: E402
from glad.model import GladModel  # noqa: E402

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
AUROC_SLACK = 1.0  # points the online model may trail the refit by


def categories(data: Path) -> list[Path]:
    """`data` itself when it is one category (has train/good), else its category folders."""
    if (data / "train").is_dir():
        return [data]
    found = sorted(p for p in data.iterdir() if (p / "train").is_dir())
    if not found:
        raise SystemExit(f"no MVTec-layout category (train/good, test/...) in {data}")
    return found


def evaluate(model: GladModel, test: list[np.ndarray], labels: np.ndarray) -> dict:
    scores = model.score(test).scores
    alarms = model.decide(scores)
    return {"auroc": 100 * image_auroc(labels, scores),
            "false_alarms": float(np.mean(alarms[labels == 0])),
            "recall": float(np.mean(alarms[labels == 1])),
            "threshold": float(model.threshold_)}


def run_category(folder: Path, fit_share: float) -> dict:
    """The frozen, online and refit rows of one category."""
    category = MVTecCategory(folder)
    roi = "margin" if category.is_texture else "full"
    train = [read_image(p) for p in category.train_paths()]
    order = np.random.default_rng(0).permutation(len(train))
    n_fit = max(4, int(round(fit_share * len(train))))
    fit = [train[i] for i in order[:n_fit]]
    confirmed = [train[i] for i in order[n_fit:]]
    items = category.test_items()
    test, labels = [read_image(i.path) for i in items], np.array([i.label for i in items])

    started = time.perf_counter()
    base = GladModel(roi=roi, progress=False).fit(fit)
    rows = {"frozen": evaluate(base, test, labels) | {"seconds": time.perf_counter() - started}}
    started = time.perf_counter()
    candidate, record = updater_candidate(base, confirmed, 8)
    rows["online"] = evaluate(candidate, test, labels) | {
        "seconds": time.perf_counter() - started,
        "gate": "passed" if record["passed"] else "; ".join(record["reasons"])}
    started = time.perf_counter()
    refit = GladModel(roi=roi, progress=False).fit(fit + confirmed)
    rows["refit"] = evaluate(refit, test, labels) | {"seconds": time.perf_counter() - started}
    return {"category": folder.name, "fit": len(fit), "confirmed": len(confirmed),
            "test": len(test), "rows": rows}


def targets(result: dict) -> dict[str, bool]:
    rows = result["rows"]
    return {"gate passed": rows["online"]["gate"] == "passed",
            f"AUROC within {AUROC_SLACK:g} of refit":
                rows["online"]["auroc"] >= rows["refit"]["auroc"] - AUROC_SLACK,
            "recall >= frozen": rows["online"]["recall"] >= rows["frozen"]["recall"]}


def print_table(results: list[dict]) -> None:
    print(f"{'category':18} {'model':7} {'images':>11} {'AUROC':>7} {'false al.':>9} "
          f"{'recall':>6} {'threshold':>10} {'s':>5}  gate")
    for result in results:
        if "error" in result:
            print(f"{result['category']:18} error: {result['error']}")
            continue
        sizes = {"frozen": f"{result['fit']}",
                 "online": f"+{result['confirmed']}",
                 "refit": f"{result['fit'] + result['confirmed']}"}
        for model, row in result["rows"].items():
            print(f"{result['category']:18} {model:7} {sizes[model]:>11} {row['auroc']:7.2f} "
                  f"{row['false_alarms']:9.2f} {row['recall']:6.2f} {row['threshold']:10.1f} "
                  f"{row['seconds']:5.0f}  {row.get('gate', '')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", type=Path, nargs="?", default=REALDATA,
                        help="one category folder or a folder of categories "
                             "(default ../shared/realdata)")
    parser.add_argument("--fit-share", type=float, default=0.5,
                        help="share of the training images the base model fits on; the rest "
                             "are confirmed (default 0.5)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for folder in categories(args.data):
        print(f"{folder.name} ...", file=sys.stderr, flush=True)
        try:
            results.append(run_category(folder, args.fit_share))
        except Exception as error:  # reported as a failed category, the others still run
            traceback.print_exc()
            results.append({"category": folder.name, "error": f"{type(error).__name__}: {error}"})
    print_table(results)
    print_targets(results, lambda result: {"ran without an exception": False}
                  if "error" in result else targets(result), args.json)


def print_targets(results: list[dict], checks: Callable[[dict], dict[str, bool]],
                  as_json: bool) -> None:
    """One PASS/FAIL line per category and target, the results as JSON when asked, and how
    many targets were missed."""
    failed = 0
    for result in results:
        for name, ok in checks(result).items():
            failed += not ok
            print(f"{'PASS' if ok else 'FAIL'}  {result['category']}: {name}")
    if as_json:
        print(json.dumps(results))
    print(f"{failed} target(s) missed" if failed else "all targets met")


if __name__ == "__main__":
    main()
