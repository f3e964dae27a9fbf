"""Speed and memory of GLAD beside PaDiM on the same backbone, in one run.

Each method runs in its own child process (so peak RSS is its own) on the same images:
fit on N normal images, then score test images in batches. Prints one table and the ratios
GLAD / PaDiM. GLAD runs without alignment here (the paper's timings exclude it too); alignment
costs about 25 ms per frame on this CPU, measured by bench_align.py.

    python3 bench/bench_core.py                       # synth nut, 200 training images, CPU
    python3 bench/bench_core.py --data ../shared/realdata/bottle
    python3 bench/bench_core.py --device cuda --json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_method(method: str, data: str, n_train: int, batch_size: int, device: str,
               threads: int, queue) -> None:
    from glad.baselines import PaDiM
    from glad.datasets import MVTecCategory
    from glad.images import read_image
    from glad.model import GladModel

    torch.set_num_threads(threads)
    category = MVTecCategory(Path(data))
    train = [read_image(p) for p in category.train_paths()[:n_train]]
    test = [read_image(item.path) for item in category.test_items()][:64]
    if method == "glad":
        # Alignment excluded, as in the paper's Table 5: bench_align.py times it separately.
        detector = GladModel(device=device, batch_size=batch_size, align=False,
                             roi="margin" if category.is_texture else "full")
    else:
        detector = PaDiM(device=device, batch_size=batch_size)
    started = time.perf_counter()
    detector.fit(train)
    fit_s = time.perf_counter() - started
    detector.score(test[:batch_size])  # warm-up
    started = time.perf_counter()
    detector.score(test)
    score_ms = 1000.0 * (time.perf_counter() - started) / len(test)
    queue.put({
        "method": method, "train_images": len(train), "test_images": len(test),
        "fit_s": fit_s, "score_ms": score_ms, "fit_img_per_s": len(train) / fit_s,
        "score_img_per_s": 1000.0 / score_ms, "model_mb": detector.model_bytes() / 1e6,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="MVTec category folder (default: synth nut, 'full' preset)")
    parser.add_argument("--train", type=int, default=200, help="training images (default 200)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            from glad.synth import PRESETS, generate_dataset

            data = str(generate_dataset(tmp, ["nut"], PRESETS["full"], seed=0)[0])
        context = mp.get_context("spawn")
        rows = []
        for method in ("glad", "padim"):
            queue = context.Queue()
            child = context.Process(target=run_method, args=(
                method, data, args.train, args.batch_size, args.device, args.threads, queue))
            child.start()
            rows.append(queue.get())
            child.join()
    if args.json:
        print(json.dumps({"data": data, "device": args.device, "threads": args.threads,
                          "results": rows}))
        return
    glad, padim = rows
    print(f"data: {data}   device: {args.device}   threads: {args.threads}   "
          f"batch: {args.batch_size}")
    header = f"{'':22s}{'GLAD':>12s}{'PaDiM':>12s}{'GLAD/PaDiM':>12s}"
    print(header)
    print("-" * len(header))
    for key, label, fmt in (
        ("train_images", "training images", "{:.0f}"),
        ("fit_s", "fit (s)", "{:.1f}"),
        ("fit_img_per_s", "fit (images/s)", "{:.2f}"),
        ("score_ms", "score (ms/image)", "{:.1f}"),
        ("score_img_per_s", "score (images/s)", "{:.1f}"),
        ("model_mb", "model (MB)", "{:.2f}"),
        ("peak_rss_mb", "peak RSS (MB)", "{:.0f}"),
    ):
        ratio = glad[key] / padim[key] if padim[key] else float("nan")
        print(f"{label:22s}{fmt.format(glad[key]):>12s}{fmt.format(padim[key]):>12s}"
              f"{ratio:>12.2f}")


if __name__ == "__main__":
    main()
