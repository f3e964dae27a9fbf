"""Detection quality of GLAD against its baselines, in one run, with the project's quality targets.

Evaluates glad, glad-global, padim and mahaad on the real categories in ../shared/realdata (when
present) and on freshly generated `glad synth` data, prints the paper-style tables, then checks:
GLAD image AUROC >= PaDiM's on every object category, pixel AUROC >= PaDiM's where masks exist,
and local (glad) >= global (glad-global).

    python3 bench/bench_quality.py                      # realdata + synth (small preset)
    python3 bench/bench_quality.py --no-real --preset tiny
    python3 bench/bench_quality.py --no-real --randomize 0 1 2 --methods glad,padim,mahaad
    python3 bench/bench_quality.py --no-synth --methods glad,padim      # the real categories only
    python3 bench/bench_quality.py --no-synth --methods glad,padim --randomize 0 1 \
        --categories bottle,casting_impeller,mpdd_metal_plate,pill_tablet  # real objects, Table 4

With --randomize, each object category is also evaluated on randomized-pose copies (paper
Table 4), and the robustness target is checked: GLAD's AUROC drop <= 1.5 points and PaDiM's drop
at least 3 times GLAD's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glad.datasets import find_categories  # noqa: E402
from glad.evaluation import METHODS, evaluate, format_table, robustness_summary  # noqa: E402
from glad.synth import PRESETS, generate_dataset  # noqa: E402

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", type=Path, default=REALDATA, help="real MVTec-layout root")
    parser.add_argument("--no-real", action="store_true", help="synthetic data only")
    parser.add_argument("--no-synth", action="store_true", help="real data only")
    parser.add_argument("--categories", default="",
                        help="comma-separated category names to keep (default: all)")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--randomize", type=int, nargs="+", default=[], metavar="SEED")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    methods = args.methods.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        categories = []
        if not args.no_real and args.real.is_dir():
            categories += find_categories(args.real)
        if not args.no_synth:
            synth_root = Path(tmp) / "synth"
            generate_dataset(synth_root, None, PRESETS[args.preset], seed=0)
            categories += find_categories(synth_root)
        if args.categories:
            wanted = set(args.categories.split(","))
            categories = [c for c in categories if c.name in wanted]
        if not categories:
            raise SystemExit("no category to evaluate")
        records = evaluate(categories, methods, progress=sys.stderr.isatty(), on_record=lambda r:
                           print(f"  {r.category} / {r.method} / {r.randomize_seed}: "
                                 f"{r.image_auroc:.3f}", file=sys.stderr, flush=True),
                           randomize_seeds=args.randomize)
    if args.json:
        print(json.dumps({"results": [r.to_dict() for r in records]}))
        return
    print(format_table(records))
    print()
    print(check_targets(records, categories))


def check_targets(records, categories) -> str:
    """One line per target and category: PASS/FAIL with the figures."""
    drops = {method: drop for method, (_, _, drop) in robustness_summary(records).items()}
    auroc = {(r.category, r.method): r.image_auroc for r in records if r.randomize_seed is None}
    pixel = {(r.category, r.method): r.pixel_auroc for r in records
             if r.randomize_seed is None and r.pixel_auroc is not None}
    lines = ["targets"]
    if "glad" in drops and "padim" in drops:
        ok = drops["glad"] <= 1.5 and drops["padim"] >= 3 * max(drops["glad"], 0.0)
        lines.append(f"  {'PASS' if ok else 'FAIL'}  randomized pose: GLAD drop {drops['glad']:.1f} "
                     f"<= 1.5 points and PaDiM drop {drops['padim']:.1f} >= 3x GLAD's")
    for category in categories:
        name = category.name
        if (name, "glad") in auroc and (name, "padim") in auroc and not category.is_texture:
            ok = auroc[(name, "glad")] >= auroc[(name, "padim")]
            lines.append(f"  {'PASS' if ok else 'FAIL'}  {name}: GLAD {auroc[(name, 'glad')]:.3f} "
                         f">= PaDiM {auroc[(name, 'padim')]:.3f}")
        if (name, "glad") in pixel and (name, "padim") in pixel:
            ok = pixel[(name, "glad")] >= pixel[(name, "padim")]
            lines.append(f"  {'PASS' if ok else 'FAIL'}  {name}: GLAD pixel AUROC "
                         f"{pixel[(name, 'glad')]:.3f} >= PaDiM {pixel[(name, 'padim')]:.3f}")
        if (name, "glad") in auroc and (name, "glad-global") in auroc:
            ok = auroc[(name, "glad")] >= auroc[(name, "glad-global")]
            lines.append(f"  {'PASS' if ok else 'FAIL'}  {name}: local {auroc[(name, 'glad')]:.3f}"
                         f" >= global {auroc[(name, 'glad-global')]:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
