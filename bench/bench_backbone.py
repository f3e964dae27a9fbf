"""Backbone runtimes on CPU: torch (frozen TorchScript) vs ONNX Runtime vs OpenVINO f32, one process.

The backbone is most of GLAD's CPU scoring time. This exports the model's backbone (the same
graph `glad export` writes) to a temporary folder, then times `extract` on one batch of
synthetic parts per runtime. Runs are interleaved (torch, onnx, openvino, torch, ...; the order
rotates every round) so load from other processes on a shared machine hits all runtimes alike;
the table shows medians, the ratio to torch, and the largest feature difference to torch
(max |a - b| / max |torch| per layer, the worst layer). Two more rows show settings GLAD does
not use, and why: ONNX Runtime with spinning intra-op threads (its default; GLAD's sleep, as
workers share the CPU), and OpenVINO at the CPU plugin's default precision (bf16 where the CPU
has it; GLAD asks for f32).

    python3 bench/bench_backbone.py                   # batch 8, 256x256, torch's thread count
    python3 bench/bench_backbone.py --rounds 40 --threads 1 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glad.backbones import FeatureExtractor, create_backbone  # noqa: E402
from glad.runtime import (  # noqa: E402
    FORMATS,
    ExportedBackbone,
    export_backbone,
    load_exported,
    max_rel_diff,
    open_onnxruntime,
    open_openvino,
)
from glad.synth import render_normal  # noqa: E402


def synthetic_batch(batch: int, size: int) -> np.ndarray:
    """`batch` synthetic nuts (uint8 (B, size, size, 3)), deterministic."""
    rng = np.random.default_rng(0)
    return np.stack([render_normal("nut", rng, size) for _ in range(batch)])


def time_runtimes(backbones: dict[str, FeatureExtractor], images: np.ndarray,
                  rounds: int) -> dict[str, list[float]]:
    """Seconds per batch for each backbone, interleaved over `rounds` rounds (after warm-up)."""
    for backbone in backbones.values():
        for _ in range(2):  # torch traces and freezes on its first call; runtimes allocate
            backbone.extract(images)
    seconds: dict[str, list[float]] = {name: [] for name in backbones}
    names = list(backbones)
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            backbones[name].extract(images)
            seconds[name].append(time.perf_counter() - started)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=20, help="timed batches per runtime")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="intra-op threads for every runtime (default: torch's, %(default)s)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch_backbone = create_backbone("efficientnet_lite0", input_size=args.size)
    backbones: dict[str, FeatureExtractor] = {"torch (frozen TorchScript)": torch_backbone}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fmt in FORMATS.items():
            export_backbone(torch_backbone, Path(tmp), name)
            label = "ONNX Runtime" if name == "onnx" else "OpenVINO f32"
            backbones[label] = load_exported(Path(tmp), fmt, torch_backbone.spec, args.threads)
        variants = {"ONNX Runtime, spinning": (FORMATS["onnx"], partial(open_onnxruntime,
                                                                          spinning=True)),
                    "OpenVINO default precision": (FORMATS["openvino"], partial(open_openvino,
                                                                                precision=None))}
        for label, (fmt, opener) in variants.items():
            backbones[label] = ExportedBackbone(torch_backbone.spec, fmt,
                                                opener(Path(tmp) / fmt.files[0], args.threads),
                                                Path(tmp), args.threads)
        images = synthetic_batch(args.batch, args.size)
        load_before = os.getloadavg()[0]
        seconds = time_runtimes(backbones, images, args.rounds)
        load_after = os.getloadavg()[0]
        diffs = {name: max_rel_diff(torch_backbone, backbone, images)
                 for name, backbone in backbones.items()}

    base = statistics.median(next(iter(seconds.values())))
    rows = [{"runtime": name, "ms_per_image": 1000.0 * statistics.median(s) / args.batch,
             "p25_ms": 1000.0 * float(np.percentile(s, 25)) / args.batch,
             "p75_ms": 1000.0 * float(np.percentile(s, 75)) / args.batch,
             "ratio_vs_torch": statistics.median(s) / base, "max_rel_diff": diffs[name]}
            for name, s in seconds.items()]
    setup = {"batch": args.batch, "size": args.size, "rounds": args.rounds,
             "threads": args.threads, "load_before": load_before, "load_after": load_after,
             "versions": {"torch": torch.__version__} | {
                 fmt.package: __import__(fmt.package).__version__ for fmt in FORMATS.values()}}
    if args.json:
        print(json.dumps({"setup": setup, "results": rows}))
        return 0
    print(f"EfficientNet-Lite0 taps, batch {args.batch}, {args.size}x{args.size}, {args.threads} "
          f"threads, {args.rounds} interleaved rounds, load {load_before:.2f} -> {load_after:.2f}")
    print(f"{'runtime':28s} {'ms/img':>8s} {'p25-p75':>13s} {'vs torch':>9s} {'max rel diff':>13s}")
    for row in rows:
        spread = f"{row['p25_ms']:.1f}-{row['p75_ms']:.1f}"
        print(f"{row['runtime']:28s} {row['ms_per_image']:8.2f} {spread:>13s} "
              f"{row['ratio_vs_torch']:9.2f} {row['max_rel_diff']:13.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
