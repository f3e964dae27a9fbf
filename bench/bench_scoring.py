"""Speed of local-mixture scoring (spec §4.6): the old per-Gaussian loop, the batched sparse
kernel and the dense masked path, on EfficientNet-Lite0 layer shapes, in one process.

Synthetic but realistically shaped models: per layer K Gaussians of dimension d on an h x w grid,
each position with 10-55 active Gaussians chosen by spatial proximity (as the localized K-MLE's
pooled counts make them), a few Gaussians with no position and one active everywhere. Methods are
interleaved within every repetition and the medians reported, since the machine may be shared.

    python3 bench/bench_scoring.py                              # CPU, 2 threads, batch 8
    python3 bench/bench_scoring.py --device cuda --batch 64
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glad.local_weights import LocalWeights  # noqa: E402
from glad.mixture import LOG_2PI, GaussianMixture, MixtureFactors  # noqa: E402
from glad.scoring import layer_loglik_dense, layer_loglik_sparse  # noqa: E402

# (name, d, grid side, K): EfficientNet-Lite0 stages at a 256 input.
LAYERS = (("L1", 24, 64, 256), ("L2", 40, 32, 192), ("L3", 112, 16, 128))
SUPPORT = (10, 55)


def loop_loglik(features: torch.Tensor, factors: MixtureFactors,
                local: LocalWeights) -> torch.Tensor:
    """The baseline: scoring before the batched kernel, one gather + GEMM + einsum per Gaussian,
    then a scatter log-sum-exp over positions."""
    b, hw, d = features.shape
    device = features.device
    gptr, positions, log_w = local.csc(device)
    const = (d * LOG_2PI + factors.logdets).to(torch.float32)
    values = torch.empty(b, len(positions), device=device)
    bounds = gptr.tolist()
    for k in range(factors.n_components):
        start, stop = bounds[k], bounds[k + 1]
        if start == stop:
            continue
        y = features[:, positions[start:stop]] @ factors.whiteners[k].t()
        y -= factors.offsets[k]
        values[:, start:stop] = log_w[start:stop] - 0.5 * (torch.einsum("bnd,bnd->bn", y, y)
                                                            + const[k])
    index = positions.expand(b, -1)
    peak = torch.full((b, hw), -math.inf, device=device).scatter_reduce(1, index, values, "amax")
    terms = torch.exp(values - peak.gather(1, index))
    total = torch.zeros(b, hw, device=device).scatter_add_(1, index, terms)
    return peak + torch.log(total)


def synthetic_layer(rng: np.random.Generator, d: int, side: int,
                    k: int) -> tuple[GaussianMixture, LocalWeights]:
    """A random mixture and spatially coherent local weights with 10-55 Gaussians per position."""
    means = rng.normal(scale=2.0, size=(k, d))
    a = rng.normal(size=(k, d, d))
    covariances = a @ a.transpose(0, 2, 1) / d + 0.3 * np.eye(d)
    mixture = GaussianMixture(np.full(k, 1.0 / k), means, covariances, np.full(k, 100),
                              np.full(k, 10))
    ys, xs = np.mgrid[0:side, 0:side] / side
    cells = np.stack([ys.ravel(), xs.ravel()], 1)
    centres = rng.uniform(size=(k, 2))
    spread = rng.uniform(0.05, 0.4, size=k)
    distance = ((cells[:, None] - centres[None]) ** 2).sum(-1) / spread**2
    distance += rng.exponential(0.5, size=distance.shape)
    distance[:, : k // 20] = np.inf  # a few Gaussians no position uses
    distance[:, -1] = -np.inf  # one Gaussian active everywhere
    smooth = 0.5 + 0.5 * np.sin(6.0 * cells[:, 0]) * np.cos(4.0 * cells[:, 1])
    support = np.round(SUPPORT[0] + (SUPPORT[1] - SUPPORT[0]) * smooth).astype(int)
    ranks = np.argsort(np.argsort(distance, axis=1), axis=1)
    weights = np.where(ranks < support[:, None], rng.uniform(0.05, 1.0, size=distance.shape), 0.0)
    weights /= weights.sum(1, keepdims=True)
    return mixture, LocalWeights.from_dense(torch.from_numpy(weights.astype(np.float32)),
                                            (side, side))


def timed(fn, args: tuple, device: torch.device) -> float:
    """Seconds for one call fn(*args), synchronising a GPU around it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rng = np.random.default_rng(args.seed)

    methods = {
        "loop": lambda f, fac, loc: loop_loglik(f, fac, loc),
        "sparse": lambda f, fac, loc: layer_loglik_sparse(f, fac, loc),
        "dense": lambda f, fac, loc: layer_loglik_dense(f, fac, loc.dense_log(f.device)),
    }
    cases = []
    for name, d, side, k in LAYERS:
        mixture, local = synthetic_layer(rng, d, side, k)
        factors = mixture.factors().to(device)
        comp = rng.integers(k, size=(args.batch, side * side))
        features = torch.from_numpy((mixture.means[comp] + rng.normal(
            size=(args.batch, side * side, d))).astype(np.float32)).to(device)
        cases.append((name, d, side, k, local, factors, features))
        # Warm-up builds the per-device caches (CSC, tiles, dense mask) and checks agreement.
        outputs, peaks = {}, []
        with torch.no_grad():
            for method, fn in methods.items():
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                outputs[method] = fn(features, factors, local)
                if device.type == "cuda":
                    peaks.append(f"{method} {torch.cuda.max_memory_allocated(device) / 2**20:.0f}")
        gap = max(float(((outputs[m] - outputs["loop"]).abs() / outputs["loop"].abs()).max())
                  for m in methods)
        tiles = local.tiles(features.device)
        print(f"{name}: d={d} grid={side}x{side} K={k} active/position={local.mean_support():.1f} "
              f"(max {tiles.slots.shape[0]}) padded pairs/active={tiles.n_slots / local.nnz:.2f} "
              f"max relative gap vs loop {gap:.1e}"
              + (f"; peak GPU MiB {', '.join(peaks)}" if peaks else ""))

    times = {(m, c[0]): [] for m in methods for c in cases}
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, _d, _side, _k, local, factors, features in cases:
                for method, fn in methods.items():
                    times[method, name].append(timed(fn, (features, factors, local), device))

    def per_image_ms(method: str, name: str) -> float:
        return 1000.0 * statistics.median(times[method, name]) / args.batch

    print(f"\nms per image (median of {args.repeats}, interleaved), device {device}, "
          f"batch {args.batch}, threads {torch.get_num_threads()}")
    print(f"{'layer':<7}" + "".join(f"{m:>10}" for m in methods)
          + "".join(f"{'loop/' + m:>13}" for m in methods if m != "loop"))
    rows = [(c[0], {m: per_image_ms(m, c[0]) for m in methods}) for c in cases]
    rows.append(("total", {m: sum(r[1][m] for r in rows) for m in methods}))
    for name, ms in rows:
        print(f"{name:<7}" + "".join(f"{ms[m]:>10.2f}" for m in methods)
              + "".join(f"{ms['loop'] / ms[m]:>12.1f}x" for m in methods if m != "loop"))


if __name__ == "__main__":
    main()
