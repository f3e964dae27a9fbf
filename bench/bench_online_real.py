"""Online learning on a real category (MVTec layout): does learning more confirmed normals online
keep or improve detection, against the model frozen after its first images and a full refit?

The base model fits on `--fit` training images (a seeded random subset); the next `--confirm`
training images are confirmed normal and go through what `glad updater` does with them: every
4th is held back with a canary defect pasted on it, the others are learned with online K-MLE in
batches of 8, and the gate sets the threshold. All three models score the category's whole test
set: image AUROC, false-alarm rate on its good images and recall on its defects at each model's
own threshold.

    python3 bench/bench_online_real.py ../shared/realdata/bottle --fit 40 --confirm 60
    python3 bench/bench_online_real.py ../shared/realdata/mpdd_metal_plate --fit 27 --confirm 27
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_online import updater_candidate  # noqa: E402
from glad.datasets import MVTecCategory  # noqa: E402
from glad.images import read_image  # noqa: E402
from glad.metrics import image_auroc  # noqa: E402
from glad.model import GladModel  # noqa: E402


def evaluate(model: GladModel, test: list[np.ndarray], labels: np.ndarray) -> str:
    scores = model.score(test).scores
    return (f"AUROC {100 * image_auroc(labels, scores):6.2f}  false alarms "
            f"{np.mean(scores[labels == 0] > model.threshold_):.2f}  recall "
            f"{np.mean(scores[labels == 1] > model.threshold_):.2f}  threshold {model.threshold_:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("category", type=Path)
    parser.add_argument("--fit", type=int, default=40)
    parser.add_argument("--confirm", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    category = MVTecCategory(args.category)
    train = [read_image(p) for p in category.train_paths()]
    order = np.random.default_rng(0).permutation(len(train))
    fit = [train[i] for i in order[: args.fit]]
    confirmed = [train[i] for i in order[args.fit : args.fit + args.confirm]]
    items = category.test_items()
    test, labels = [read_image(i.path) for i in items], np.array([i.label for i in items])

    started = time.perf_counter()
    base = GladModel().fit(fit)
    print(f"{args.category.name}: base fit on {len(fit)} images ({time.perf_counter() - started:.0f} s), "
          f"{len(confirmed)} more confirmed normal; test: {len(test)} images", flush=True)
    print(f"frozen   {evaluate(base, test, labels)}", flush=True)

    started = time.perf_counter()
    candidate, record = updater_candidate(base, confirmed, 8)
    verdict = "passed" if record["passed"] else "; ".join(record["reasons"])
    print(f"online   {evaluate(candidate, test, labels)}  gate {verdict} "
          f"({time.perf_counter() - started:.0f} s)", flush=True)

    started = time.perf_counter()
    refit = GladModel().fit(fit + confirmed)
    print(f"refit    {evaluate(refit, test, labels)}  ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
