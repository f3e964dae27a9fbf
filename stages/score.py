"""The score stage: features -> scores. Scores each frame under the line's current model.

Output per frame: score, decision, threshold, model version, status, per-stage timings, and for
anomalous frames the heat map (float16, model input size, in the frame's own geometry). Outputs
are idempotent by frame id: a frame delivered twice is scored once.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from glad.align import Alignment, unwarp_heatmap
from pipeline.errors import MessageError
from pipeline.payloads import message_features, message_validity
from pipeline.schema import Message, pack_array, unpack_array
from stages._model import ModelStage


class ScoreStage(ModelStage):
    name = "score"
    input = "features"
    output = "scores"
    idempotent = True

    def process(self, messages: list[Message]) -> list[Message]:
        """Scores in input order; each frame by the model version that aligned it (a hot swap
        never mixes a reference image with another version's mixtures)."""
        started = time.perf_counter()
        groups: dict[object, list[int]] = {}
        for index, message in enumerate(messages):
            groups.setdefault(message.models.get("align"), []).append(index)
        out: list[Message | None] = [None] * len(messages)
        for version, indices in groups.items():
            model, used = self.follower.model_for(version)
            for index, result in zip(indices, self._score(model, [messages[i] for i in indices]),
                                     strict=True):
                result.models["score"] = used
                out[index] = result
        per_frame = 1000.0 * (time.perf_counter() - started) / len(messages)
        for result in out:
            result.timings["score"] = per_frame
        return out

    def _score(self, model, messages: list[Message]) -> list[Message]:
        size = model.backbone_.spec.input_size
        usable = [i for i, m in enumerate(messages) if m.body["status"] == "ok"]
        features = [message_features(model, messages[i]) for i in usable]
        valid = np.stack([message_validity(messages[i], size) for i in usable]) if usable else None
        scores, maps = np.zeros(0), np.zeros((0, size, size), np.float32)
        if usable:
            layers = [torch.from_numpy(np.stack([f[layer] for f in features])).float()
                      .to(model.backbone_.device) for layer in range(len(features[0]))]
            scores, maps = model.score_features(layers, valid)
        out = []
        for index, message in enumerate(messages):
            row = usable.index(index) if index in usable else None
            score = math.inf if row is None else float(scores[row])
            anomalous = not score <= model.threshold_  # NaN (nothing to score) alarms too
            heatmap = None
            if anomalous and row is not None:
                heatmap = pack_array(self._unwarped(maps[row], message, size).astype(np.float16))
            out.append(message.derive("score", {
                "score": score, "anomalous": anomalous, "threshold": float(model.threshold_),
                "status": message.body["status"], "heatmap": heatmap,
                "frame_shape": message.body["frame_shape"]}))
        return out

    @staticmethod
    def _unwarped(heatmap: np.ndarray, message: Message, size: int) -> np.ndarray:
        """The heat map in the frame's geometry (at the input size), as `GladModel.score` gives."""
        if message.body["warp"] is None:
            return heatmap
        warp = unpack_array(message.body["warp"], "warp", dtype="float64", ndim=2)
        if warp.shape != (3, 3):
            raise MessageError(f"frame {message.frame_id}: warp of shape {list(warp.shape)}")
        alignment = Alignment(warp, None, None, 0.0, True, "", (size, size))
        return unwarp_heatmap(heatmap, alignment, (size, size))


