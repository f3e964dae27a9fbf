"""CPU vs CUDA parity of GLAD scoring: one model, the same images, scores and heat maps compared.

    python3 bench/check_cuda_parity.py          # needs a CUDA device
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glad.datasets import MVTecCategory  # noqa: E402
from glad.images import read_image  # noqa: E402
from glad.model import GladModel  # noqa: E402
from glad.synth import PRESETS, generate_dataset  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        category = MVTecCategory(generate_dataset(tmp, ["nut"], PRESETS["small"], seed=0)[0])
        train = [read_image(p) for p in category.train_paths()]
        test = [read_image(item.path) for item in category.test_items()]
        model = GladModel().fit(train)
        model.save(Path(tmp) / "model")
        cpu = model.score(test)
        cuda = GladModel.load(Path(tmp) / "model", device="cuda").score(test)
    score_gap = np.abs(cpu.scores - cuda.scores).max()
    relative = score_gap / np.abs(cpu.scores).max()
    heat_gap = np.abs(cpu.heatmaps - cuda.heatmaps).max() / np.abs(cpu.heatmaps).max()
    print(f"images {len(test)}  max |score cpu - cuda| {score_gap:.4g} (relative {relative:.2e})  "
          f"max relative heat-map gap {heat_gap:.2e}  "
          f"same ranking: {bool((np.argsort(cpu.scores) == np.argsort(cuda.scores)).all())}")


if __name__ == "__main__":
    main()
