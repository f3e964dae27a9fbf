"""Detection quality of GLAD against its baselines, in one run, with the project's quality targets.

Evaluates glad, glad-global, padim and mahaad on the real categories in ../shared/realdata (when
present) and on freshly generated `glad synth` data, prints the paper-style tables, then checks:
GLAD image AUROC >= PaDiM's on every object category, and local (glad) >= global (glad-global).

    python3 bench/bench_quality.py                      # realdata + synth (small preset)
    python3 bench/bench_quality.py --no-real --preset tiny
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glad.datasets import find_categories  # noqa: E402
from glad.evaluation import METHODS, evaluate, format_table  # noqa: E402
from glad.synth import PRESETS, generate_dataset  # noqa: E402

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", type=Path, default=REALDATA, help="real MVTec-layout root")
    parser.add_argument("--no-real", action="store_true", help="synthetic data only")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    methods = args.methods.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        categories = []
        if not args.no_real and args.real.is_dir():
            categories += find_categories(args.real)
        synth_root = Path(tmp) / "synth"
        generate_dataset(synth_root, None, PRESETS[args.preset], seed=0)
        categories += find_categories(synth_root)
        records = evaluate(categories, methods, progress=sys.stderr.isatty(), on_record=lambda r:
                           print(f"  {r.category} / {r.method}: {r.image_auroc:.3f}",
                                 file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps({"results": [r.to_dict() for r in records]}))
        return
    print(format_table(records))
    print()
    print(check_targets(records, categories))


def check_targets(records, categories) -> str:
    """One line per target and category: PASS/FAIL with the figures."""
    auroc = {(r.category, r.method): r.image_auroc for r in records}
    lines = ["targets"]
    for category in categories:
        name = category.name
        if (name, "glad") in auroc and (name, "padim") in auroc and not category.is_texture:
            ok = auroc[(name, "glad")] >= auroc[(name, "padim")]
            lines.append(f"  {'PASS' if ok else 'FAIL'}  {name}: GLAD {auroc[(name, 'glad')]:.3f} "
                         f">= PaDiM {auroc[(name, 'padim')]:.3f}")
        if (name, "glad") in auroc and (name, "glad-global") in auroc:
            ok = auroc[(name, "glad")] >= auroc[(name, "glad-global")]
            lines.append(f"  {'PASS' if ok else 'FAIL'}  {name}: local {auroc[(name, 'glad')]:.3f}"
                         f" >= global {auroc[(name, 'glad-global')]:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
