"""CPU vs CUDA parity of GLAD scoring: one model, the same images, scores and heat maps compared.

Per layer, every scoring path (sparse tiles and dense masked, spec §4.6) on every device is
compared with the CPU sparse log-likelihood map; then, with a CUDA device, the CPU model's scores
and heat maps with those of the same model loaded on CUDA (which scores with method "auto"), with
the backbone in fp32 and in bf16 (target for bf16: scores within 1e-2 relative, same ranking).
Without CUDA only the CPU comparisons run.

    python3 bench/check_cuda_parity.py
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glad.backbones import PRECISIONS, create_backbone  # noqa: E402
from glad.datasets import MVTecCategory  # noqa: E402
from glad.features import iter_features  # noqa: E402
from glad.images import read_image  # noqa: E402
from glad.model import GladModel  # noqa: E402
from glad.synth import PRESETS, generate_dataset  # noqa: E402


def layer_gaps(model: GladModel, images: list[np.ndarray], devices: list[str]) -> None:
    """Print, per layer, each (device, method)'s largest relative gap to the CPU sparse map."""
    features = next(iter_features(model.backbone_, images, len(images)))
    for index, (layer, feature) in enumerate(zip(model.layers_, features, strict=True)):
        flat = feature.flatten(2).transpose(1, 2).contiguous().cpu()
        reference = layer.loglik(flat, method="sparse")
        gaps = []
        for device in devices:
            moved = replace(layer, factors=layer.factors.to(device))
            for method in ("sparse", "dense"):
                out = moved.loglik(flat.to(device), method=method).cpu()
                gap = float(((out - reference).abs() / reference.abs()).max())
                gaps.append(f"{device}/{method} {gap:.1e}")
        print(f"layer {index + 1} (d={flat.shape[-1]}, grid {tuple(layer.grid)}): max relative "
              f"gap to cpu/sparse: " + "  ".join(gaps))


def main() -> None:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as tmp:
        category = MVTecCategory(generate_dataset(tmp, ["nut"], PRESETS["small"], seed=0)[0])
        train = [read_image(p) for p in category.train_paths()]
        test = [read_image(item.path) for item in category.test_items()]
        model = GladModel().fit(train)
        layer_gaps(model, test, devices)
        if "cuda" not in devices:
            print("no CUDA device: the CPU vs CUDA comparison of scores and heat maps is skipped")
            return
        model.save(Path(tmp) / "model")
        cpu = model.score(test)
        for precision in PRECISIONS:
            backbone = create_backbone(device="cuda", precision=precision)
            cuda = GladModel.load(Path(tmp) / "model", backbone=backbone, device="cuda").score(test)
            score_gap = np.abs(cpu.scores - cuda.scores).max()
            relative = score_gap / np.abs(cpu.scores).max()
            heat_gap = np.abs(cpu.heatmaps - cuda.heatmaps).max() / np.abs(cpu.heatmaps).max()
            same = bool((np.argsort(cpu.scores) == np.argsort(cuda.scores)).all())
            print(f"backbone {precision}: images {len(test)}  max |score cpu - cuda| "
                  f"{score_gap:.4g} (relative {relative:.2e})  max relative heat-map gap "
                  f"{heat_gap:.2e}  same ranking: {same}")


if __name__ == "__main__":
    main()
