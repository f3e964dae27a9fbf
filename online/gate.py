"""The validation gate (spec §7.6): a candidate model is published only if it is sound and not
worse than production on frames neither of them trained on.

* Structure: finite parameters, positive-definite covariances, weights and local maps that sum
  to one, the production model's backbone and preprocessing, K within bounds.
* False alarms: held-back confirmed-normal frames (never trained on), split by time. The
  candidate's threshold comes from the older half (never below production's); on the newer half
  it may not raise more alarms than production does at its own threshold.
* Defects: canaries (operator-confirmed defects and synthetic defects pasted on held-back normal
  frames). Recall at the threshold may not drop by more than `recall_tolerance` (on canaries
  whose frame both models accept), and the AUROC of canaries against held-back normals by more
  than `auroc_tolerance`.
"""

from __future__ import annotations

import weakref
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from glad.metrics import image_auroc
from glad.model import GladModel, decision_threshold

CANARY_SUFFIX = "#canary"


@dataclass
class Example:
    """A frame the gate scores: backbone features (float16 (d, h, w) per layer) and validity."""

    frame_id: str
    features: list[np.ndarray]
    valid: np.ndarray  # (S, S) bool

    @property
    def base(self) -> str | None:
        """The normal frame a synthetic canary was pasted on (None for anything else)."""
        return self.frame_id.removesuffix(CANARY_SUFFIX) if self.frame_id.endswith(
            CANARY_SUFFIX) else None


@dataclass(frozen=True)
class GateConfig:
    min_held_back: int = 4  # fewer held-back normal frames: nothing is published yet
    # The most recent held-back frames and canaries kept. Every candidate is scored on all of
    # them (production's scores are cached): about 0.1 s a frame for the default backbone on a
    # 2-core CPU, so 6 + 6 keeps a confirmation-to-publish under 2 s there. Raise on a GPU.
    held_back: int = 6
    canaries: int = 6
    recall_tolerance: float = 0.1
    auroc_tolerance: float = 0.005
    max_growth: float = 4.0  # K may grow to this many times the base model's


class Gate:
    """The held-back normals and canaries of one line, and the check of a candidate."""

    def __init__(self, config: GateConfig | None = None):
        self.config = config or GateConfig()
        self.held_back: deque[Example] = deque(maxlen=self.config.held_back)
        self.canaries: deque[Example] = deque(maxlen=self.config.canaries)
        # scores by model (weakly: a model nobody holds any more drops out) and frame id
        self._cache: weakref.WeakKeyDictionary[GladModel, dict[str, float]] = (
            weakref.WeakKeyDictionary())

    def evaluate(self, candidate: GladModel, production: GladModel, base_components: list[int],
                 ) -> tuple[float, dict]:
        """The candidate's threshold and the validation record: {"passed", "reasons", figures}."""
        reasons = structural_problems(candidate, production, base_components,
                                      self.config.max_growth)
        normals = list(self.held_back)
        record: dict = {"held_back": len(normals), "canaries": len(self.canaries)}
        threshold = float(production.threshold_)
        if len(normals) < self.config.min_held_back:
            reasons.append(f"only {len(normals)} held-back normal frames, "
                           f"{self.config.min_held_back} needed to measure false alarms")
        elif not reasons:
            threshold = self._compare(candidate, production, normals, record, reasons)
        record |= {"threshold": threshold, "passed": not reasons, "reasons": reasons}
        return threshold, record

    def _compare(self, candidate: GladModel, production: GladModel, normals: list[Example],
                 record: dict, reasons: list[str]) -> float:
        half = len(normals) // 2
        canaries = list(self.canaries)
        cand_all = self._scores(candidate, normals + canaries)
        prod_all = self._scores(production, normals + canaries)
        cand_normal, prod_normal = cand_all[: len(normals)], prod_all[: len(normals)]
        cand_def, prod_def = cand_all[len(normals) :], prod_all[len(normals) :]
        threshold = max(float(production.threshold_), decision_threshold(cand_normal[:half]))
        far = {"candidate": int((cand_normal[half:] > threshold).sum()),
               "production": int((prod_normal[half:] > production.threshold_).sum()),
               "frames": len(normals) - half}
        record["false_alarms"] = far
        if far["candidate"] > far["production"]:
            reasons.append(f"more false alarms on held-back normal frames: {far['candidate']} of "
                           f"{far['frames']} against production's {far['production']}")
        if not canaries:
            reasons.append("no defect canaries to check recall on")
            return threshold
        # A canary pasted on a frame that a model already flags says nothing about how that model
        # sees defects: recall is compared on canaries whose frame both models accept.
        accepted = {e.frame_id for e, c, p in zip(normals, cand_normal, prod_normal, strict=True)
                    if c <= threshold and p <= production.threshold_}
        fair = np.array([e.base is None or e.base in accepted for e in canaries])
        recall = {"candidate": float((cand_def[fair] > threshold).mean()) if fair.any() else None,
                  "production": float((prod_def[fair] > production.threshold_).mean())
                  if fair.any() else None, "frames": int(fair.sum())}
        record["recall"] = recall
        if fair.any() and recall["candidate"] < recall["production"] - self.config.recall_tolerance:
            reasons.append(f"recall on defect canaries fell from {recall['production']:.2f} to "
                           f"{recall['candidate']:.2f}")
        labels = np.r_[np.zeros(len(normals)), np.ones(len(canaries))]
        auroc = {"candidate": image_auroc(labels, np.r_[cand_normal, cand_def]),
                 "production": image_auroc(labels, np.r_[prod_normal, prod_def])}
        record["auroc"] = auroc
        if auroc["candidate"] < auroc["production"] - self.config.auroc_tolerance:
            reasons.append(f"AUROC of canaries against held-back normals fell from "
                           f"{auroc['production']:.4f} to {auroc['candidate']:.4f}")
        return threshold

    def _scores(self, model: GladModel, examples: list[Example]) -> np.ndarray:
        """Scores of examples under `model`, each computed once per model (production's scores
        carry over from when it was the candidate), in one batch for the missing ones."""
        cache = self._cache.setdefault(model, {})
        missing = [e for e in examples if e.frame_id not in cache]
        for example, value in zip(missing, scores(model, missing), strict=True):
            cache[example.frame_id] = float(value)
        return np.array([cache[e.frame_id] for e in examples])


def scores(model: GladModel, examples: list[Example], batch: int = 32) -> np.ndarray:
    """Image scores of examples under `model`."""
    out = []
    device = model.backbone_.device
    for start in range(0, len(examples), batch):
        chunk = examples[start : start + batch]
        layers = [torch.from_numpy(np.stack([e.features[i] for e in chunk])).float().to(device)
                  for i in range(len(chunk[0].features))]
        out.append(model.score_features(layers, np.stack([e.valid for e in chunk]))[0])
    return np.concatenate(out) if out else np.zeros(0)


def structural_problems(candidate: GladModel, production: GladModel, base_components: list[int],
                        max_growth: float) -> list[str]:
    """What is unsound in a candidate (an empty list when nothing is)."""
    problems = []
    if (candidate.backbone_.spec.preprocessing_hash()
            != production.backbone_.spec.preprocessing_hash()):
        problems.append("backbone or preprocessing differs from production's")
    for index, (layer, k0) in enumerate(zip(candidate.layers_, base_components, strict=True)):
        name = f"layer {index + 1}"
        mixture, factors = layer.mixture, layer.factors
        if not all(torch.isfinite(t).all() for t in (factors.whiteners, factors.offsets,
                                                      factors.logdets, factors.log_weights)):
            problems.append(f"{name}: parameters are not finite")
        if abs(float(mixture.weights.sum()) - 1.0) > 1e-6:
            problems.append(f"{name}: mixture weights sum to {mixture.weights.sum():.8f}")
        if not 1 <= mixture.n_components <= max_growth * k0:
            problems.append(f"{name}: {mixture.n_components} Gaussians (base model: {k0})")
        if layer.local is not None:
            rows = layer.local.dense().sum(1)
            if not torch.allclose(rows, torch.ones_like(rows), atol=1e-4):
                problems.append(f"{name}: local weights do not sum to 1 at every position")
    return problems
