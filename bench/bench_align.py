"""Accuracy and speed of glad.align on synthetic parts with known warps and pasted defects.

For each motion model, ~40 cases (nut and pcb, alternating): a normal part gets a defect, then a
random known warp (±8° rotation, ±12 px shift; ±4 % scale for similarity/affine, ±3 % shear for
affine/homography, small perspective for homography) and sensor noise; the frame is aligned back
on the clean part. Prints the corner error (mean distance of the four reference corners, px at
256x256), the number of rejected frames and the time per `align` call (wall clock, and the CPU
time of the process, which on a shared machine leaves out the time other processes took the core),
then checks the camera-rate targets of issue "Real-time GLAD" on one core: median <= 8 ms and
p95 <= 15 ms (wall) per frame, median corner error <= 0.05 px.

    python3 bench/bench_align.py                 # 40 cases per motion
    python3 bench/bench_align.py --cases 100 --threads 2
"""

from __future__ import annotations

import os

# One core means NumPy's BLAS too; it must be set before NumPy loads it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glad import synth  # noqa: E402
from glad.align import Aligner, random_warp  # noqa: E402

SIZE = 256
MOTIONS = ("euclidean", "similarity", "affine", "homography")
CORNERS = np.array([[0, 0, 1], [SIZE - 1, 0, 1], [0, SIZE - 1, 1], [SIZE - 1, SIZE - 1, 1]], float).T
# (result key, limit, label) of the camera-rate targets
TARGETS = (("ms_median", 8.0, "median <= 8 ms"), ("ms_p95", 15.0, "p95 <= 15 ms"),
           ("median_px", 0.05, "error <= 0.05 px"))


def case(motion: str, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reference, frame, true warp) of one benchmark case."""
    rng = np.random.default_rng(1000 * MOTIONS.index(motion) + index)
    category = ("nut", "pcb")[index % 2]
    reference = synth.render_normal(category, rng)
    defects = synth.defect_types(category)
    damaged, _ = synth.add_defect(reference, category, defects[index % len(defects)], rng)
    warp = random_warp(motion, rng)
    frame = cv2.warpPerspective(damaged, warp, (SIZE, SIZE), borderMode=cv2.BORDER_REPLICATE)
    frame = np.clip(frame + rng.normal(0, 2, frame.shape), 0, 255).astype(np.uint8)
    return reference, frame, warp


def corner_error(true: np.ndarray, estimate: np.ndarray) -> float:
    a, b = true @ CORNERS, estimate @ CORNERS
    return float(np.linalg.norm(a[:2] / a[2] - b[:2] / b[2], axis=0).mean())


def run(motion: str, cases: int) -> dict[str, float]:
    errors, times, cpu_times, failures = [], [], [], 0
    for index in range(cases):
        reference, frame, warp = case(motion, index)
        aligner = Aligner(reference, motion=motion)
        start, cpu_start = time.perf_counter(), time.process_time()
        result = aligner.align(frame)
        times.append(1000 * (time.perf_counter() - start))
        cpu_times.append(1000 * (time.process_time() - cpu_start))
        failures += not result.ok
        errors.append(corner_error(warp, result.warp))
    return {"median_px": np.median(errors), "p95_px": np.percentile(errors, 95), "max_px": max(errors),
            "failures": failures, "ms_median": np.median(times), "ms_p95": np.percentile(times, 95),
            "cpu_median": np.median(cpu_times)}


def verdict(result: dict[str, float]) -> str:
    """PASS, or FAIL with the targets missed."""
    missed = [label for key, limit, label in TARGETS if result[key] > limit]
    return "FAIL: " + ", ".join(missed) if missed else "PASS"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="cv2.setNumThreads")
    args = parser.parse_args()
    cv2.setNumThreads(args.threads)
    # untimed: the first call in a process pays one-off costs (OpenCV and NumPy initialisation,
    # about 15 ms) that a streaming worker pays once
    Aligner(case(MOTIONS[0], 0)[0]).align(case(MOTIONS[0], 0)[1])
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"{args.cases} cases per motion, cv2 {cv2.__version__}, {args.threads} OpenCV thread(s), "
          f"load average {load} on {os.cpu_count()} CPUs")
    print("targets: " + ", ".join(label for _, _, label in TARGETS) + " (ms: wall clock per frame)")
    header = ("motion", "median px", "p95 px", "max px", "fails", "ms med", "ms p95", "cpu med", "targets")
    print("{:<11} {:>9} {:>7} {:>7} {:>5} {:>7} {:>7} {:>7}  {}".format(*header))
    for motion in MOTIONS:
        r = run(motion, args.cases)
        print(f"{motion:<11} {r['median_px']:>9.3f} {r['p95_px']:>7.3f} {r['max_px']:>7.2f} "
              f"{r['failures']:>5d} {r['ms_median']:>7.1f} {r['ms_p95']:>7.1f} {r['cpu_median']:>7.1f}  "
              f"{verdict(r)}")


if __name__ == "__main__":
    main()
