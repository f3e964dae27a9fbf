"""Speed and memory of GLAD beside PaDiM on the same backbone, in one run; how GLAD's cost scales.

Each method runs in its own child process (so peak RSS is its own) on the same images: fit on N
normal images, then score test images in batches, backbone included. GLAD is scored twice: with
the torch backbone, and with the backbone exported to the fastest installed runtime
(`glad export`, OpenVINO or ONNX Runtime; `--runtime` picks one), loaded in a fresh process as
a worker loads it (fit time and model size are the same model's). PaDiM runs its
torch backbone. Prints one table with the ratios GLAD / PaDiM. GLAD runs without alignment here
(the paper's timings exclude it too); bench_align.py times alignment.

With --scaling it also prints how GLAD's cost grows: fit time and model size against the number
of training images (the model's size must not grow with it), and scoring time (mixtures only,
and with the backbone) against K, the feature grid (input size) and the batch size.

    python3 bench/bench_core.py                       # synth nut, 200 training images, CPU
    python3 bench/bench_core.py --data ../shared/realdata/bottle
    python3 bench/bench_core.py --scaling             # plus the scaling tables
    python3 bench/bench_core.py --device cuda --batch-size 64 --json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCALING_TRAIN = (25, 50, 100, 200)
SCALING_K = (32, 64, 128, 256)
SCALING_SIZES = (128, 256, 384)
SCALING_BATCHES = (1, 8, 32, 64)


def _timed_score(detector, images: list, batch_size: int, repeats: int = 3) -> float:
    """ms per image of `detector.score` over `images` in batches: the median of `repeats`
    passes after one untimed pass (exported runtimes and the scoring caches warm up over the
    first few batches)."""
    detector.batch_size = batch_size
    detector.score(images)
    times = []
    for _ in range(repeats):
        if detector.device != "cpu":
            torch.cuda.synchronize()
        started = time.perf_counter()
        detector.score(images)
        if detector.device != "cpu":
            torch.cuda.synchronize()
        times.append(1000.0 * (time.perf_counter() - started) / len(images))
    return float(np.median(times))


def _load_category(data: str, n_train: int):
    from glad.datasets import MVTecCategory
    from glad.images import read_image

    category = MVTecCategory(Path(data))
    train = [read_image(p) for p in category.train_paths()[:n_train]]
    test = [read_image(item.path) for item in category.test_items()][:64]
    return category, train, test


def run_method(method: str, data: str, n_train: int, batch_size: int, device: str,
               threads: int, model_dir: str, queue) -> None:
    """Fit and score one method; GLAD's model is saved to `model_dir` for `run_exported`."""
    from glad.baselines import PaDiM
    from glad.model import GladModel

    torch.set_num_threads(threads)
    category, train, test = _load_category(data, n_train)
    if method == "glad":
        detector = GladModel(device=device, batch_size=batch_size, align=False,
                             roi="margin" if category.is_texture else "full")
    else:
        detector = PaDiM(device=device, batch_size=batch_size)
    started = time.perf_counter()
    detector.fit(train)
    fit_s = time.perf_counter() - started
    score_ms = _timed_score(detector, test, batch_size)
    if method == "glad":
        detector.save(model_dir)
    queue.put({"method": method, "runtime": "torch", "train_images": len(train),
               "test_images": len(test), "fit_s": fit_s, "fit_img_per_s": len(train) / fit_s,
               "score_ms": score_ms, "score_img_per_s": 1000.0 / score_ms,
               "model_mb": detector.model_bytes() / 1e6,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0})


def export(model_dir: str, runtime: str, queue) -> None:
    """`glad export` of GLAD's saved model: the first of the runtimes asked for that is
    installed (None when none is)."""
    from glad.runtime import export_model

    for name in (("openvino", "onnx") if runtime == "auto" else (runtime,)):
        try:
            export_model(Path(model_dir), name)
        except Exception as error:  # the optional runtime is not installed
            print(f"glad export --format {name}: {error}", file=sys.stderr)
            continue
        queue.put(name)
        return
    queue.put(None)


def run_exported(data: str, batch_size: int, threads: int, model_dir: str, runtime: str,
                 queue) -> None:
    """GLAD's saved model with its exported backbone, loaded and scored in a fresh process as a
    worker does."""
    from glad.model import GladModel

    torch.set_num_threads(threads)
    _, _, test = _load_category(data, 0)
    model = GladModel.load(model_dir, runtime=runtime)
    score_ms = _timed_score(model, test, batch_size)
    queue.put({"runtime": model.backbone_.runtime, "score_ms": score_ms,
               "score_img_per_s": 1000.0 / score_ms,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0})


def run_scaling(data: str, batch_size: int, device: str, threads: int, queue) -> None:
    """GLAD's fit and scoring costs against N, K, grid and batch (one process, synth data)."""
    from glad.backbones import create_backbone
    from glad.model import GladModel

    torch.set_num_threads(threads)
    _, train, test = _load_category(data, max(SCALING_TRAIN))
    backbone = create_backbone(device=device)
    rows = {"train": [], "k": [], "grid": [], "batch": []}

    def fitted(n: int, k: int = 256, model_backbone=backbone) -> GladModel:
        return GladModel(model_backbone, device=device, batch_size=batch_size, align=False,
                         max_components=k).fit(train[:n])

    def mixture_ms(model: GladModel, batch: int) -> float:
        """ms per image of the mixture part alone (features computed beforehand)."""
        features = model.backbone_.extract(np.stack(model._resized(test[:batch])))
        valid = np.ones((batch, *model.roi_.shape), bool)
        model.score_features(features, valid)
        started = time.perf_counter()
        for _ in range(3):
            model.score_features(features, valid)
        return 1000.0 * (time.perf_counter() - started) / (3 * batch)

    for n in SCALING_TRAIN:
        started = time.perf_counter()
        model = fitted(n)
        rows["train"].append({"train_images": n, "fit_s": time.perf_counter() - started,
                              "model_mb": model.model_bytes() / 1e6,
                              "K": [layer.mixture.n_components for layer in model.layers_]})
    base = fitted(50)
    for k in SCALING_K:
        model = fitted(50, k)
        rows["k"].append({"max_K": k, "K": [layer.mixture.n_components for layer in model.layers_],
                          "mixture_ms": mixture_ms(model, batch_size),
                          "active": [round(layer.local.mean_support(), 1) for layer in model.layers_
                                     if layer.local is not None]})
    for size in SCALING_SIZES:
        model = fitted(50, model_backbone=create_backbone(device=device, input_size=size))
        rows["grid"].append({"input": size, "grids": [list(layer.grid) for layer in model.layers_],
                             "mixture_ms": mixture_ms(model, batch_size),
                             "score_ms": _timed_score(model, test, batch_size)})
    for batch in SCALING_BATCHES:
        rows["batch"].append({"batch": batch, "mixture_ms": mixture_ms(base, min(batch, len(test))),
                              "score_ms": _timed_score(base, test, batch)})
    queue.put(rows)


def _in_child(target, *args):
    context = mp.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=target, args=(*args, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def print_comparison(rows: list[dict]) -> None:
    padim = next(r for r in rows if r["method"] == "padim")
    glads = [r for r in rows if r["method"] != "padim"]
    names = [("GLAD " + r["runtime"]) for r in glads]
    header = f"{'':22s}" + "".join(f"{n:>18s}" for n in names) + f"{'PaDiM torch':>14s}" + "".join(
        f"{'ratio ' + r['runtime']:>18s}" for r in glads)
    print(header)
    print("-" * len(header))
    for key, label, fmt in (
        ("train_images", "training images", "{:.0f}"),
        ("fit_s", "fit (s)", "{:.1f}"),
        ("score_ms", "score (ms/image)", "{:.1f}"),
        ("score_img_per_s", "score (images/s)", "{:.1f}"),
        ("model_mb", "model (MB)", "{:.2f}"),
        ("peak_rss_mb", "peak RSS (MB)", "{:.0f}"),
    ):
        line = f"{label:22s}" + "".join(f"{fmt.format(r[key]):>18s}" for r in glads)
        line += f"{fmt.format(padim[key]):>14s}"
        line += "".join(f"{r[key] / padim[key] if padim[key] else float('nan'):>18.2f}"
                        for r in glads)
        print(line)


def print_table(title: str, columns: list[tuple[str, str, str]], rows: list[dict]) -> None:
    """A titled table; `columns` are (header, key, format spec): numbers right-aligned, lists
    (spec "") left-aligned after them."""
    def cell(header: str, text: str, spec: str) -> str:
        return f"  {text}" if not spec else f"{text:>{max(10, len(header) + 2)}s}"

    print(f"\n{title}")
    print("".join(cell(header, header, spec) for header, _, spec in columns))
    for row in rows:
        print("".join(cell(header, format(row[key], spec), spec) for header, key, spec in columns))


def print_scaling(rows: dict) -> None:
    print_table("fit against training images (the model's size must not grow with them)",
                [("images", "train_images", "d"), ("fit s", "fit_s", ".1f"),
                 ("model MB", "model_mb", ".2f"), ("K per layer", "K", "")], rows["train"])
    print_table("scoring against K (50 training images; mixtures only, ms/image)",
                [("max K", "max_K", "d"), ("mixture ms", "mixture_ms", ".2f"),
                 ("K per layer", "K", ""), ("active per position", "active", "")], rows["k"])
    print_table("scoring against the feature grid (input size; ms/image)",
                [("input", "input", "d"), ("mixture ms", "mixture_ms", ".2f"),
                 ("total ms", "score_ms", ".1f"), ("grids", "grids", "")], rows["grid"])
    print_table("scoring against the batch size (ms/image)",
                [("batch", "batch", "d"), ("mixture ms", "mixture_ms", ".2f"),
                 ("total ms", "score_ms", ".1f")], rows["batch"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="MVTec category folder (default: synth nut, 'full' preset)")
    parser.add_argument("--train", type=int, default=200, help="training images (default 200)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--runtime", default="auto", choices=("auto", "torch", "onnx", "openvino"),
                        help="exported backbone runtime for GLAD's second row (default: OpenVINO, "
                             "else ONNX Runtime, whichever is installed)")
    parser.add_argument("--scaling", action="store_true", help="also print the scaling tables")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            from glad.synth import PRESETS, generate_dataset

            data = str(generate_dataset(tmp, ["nut"], PRESETS["full"], seed=0)[0])
        model_dir = str(Path(tmp) / "glad-model")
        common = (data, args.train, args.batch_size, args.device, args.threads, model_dir)
        rows = [_in_child(run_method, "glad", *common)]
        runtime = (_in_child(export, model_dir, args.runtime)
                   if args.device == "cpu" and args.runtime != "torch" else None)
        if runtime is not None:
            exported = _in_child(run_exported, data, args.batch_size, args.threads, model_dir,
                                 runtime)
            rows.append(rows[0] | exported | {"method": "glad+" + exported["runtime"]})
        rows.append(_in_child(run_method, "padim", *common))
        scaling = (_in_child(run_scaling, data, args.batch_size, args.device, args.threads)
                   if args.scaling else None)
    if args.json:
        print(json.dumps({"data": data, "device": args.device, "threads": args.threads,
                          "results": rows, "scaling": scaling}))
        return
    print(f"data: {data}   device: {args.device}   threads: {args.threads}   "
          f"batch: {args.batch_size}   load average before: {load_before:.2f}, after: "
          f"{os.getloadavg()[0]:.2f}")
    print_comparison(rows)
    if scaling is not None:
        print_scaling(scaling)


if __name__ == "__main__":
    main()
