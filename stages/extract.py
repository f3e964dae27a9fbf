"""The extract stage: aligned -> features. The backbone on a batch of frames (GPU when the worker
runs with a CUDA device), features sent as float16 per layer (d, h, w).

Frames that failed alignment are passed on without features. The backbone runs on torch or, on
CPU, on an exported runtime (ONNX Runtime, OpenVINO: `glad export`); the worker logs which.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from glad.errors import FeatureError
from pipeline.errors import MessageError
from pipeline.schema import Message, pack_array, unpack_array
from stages._model import ModelStage

log = logging.getLogger(__name__)


class ExtractStage(ModelStage):
    name = "extract"
    input = "aligned"
    output = "features"
    _reported: object = None  # the backbone whose runtime was last logged

    def process(self, messages: list[Message]) -> list[Message]:
        started = time.perf_counter()
        backbone = self.model.backbone_
        if backbone is not self._reported:
            log.info("extract: backbone %s on %s (model version %s)", backbone.spec.name,
                     backbone.runtime, self.model_version)
            self._reported = backbone
        size = backbone.spec.input_size
        usable = [i for i, m in enumerate(messages) if m.body["status"] == "ok"]
        images = [unpack_array(messages[i].body["image"], "image", dtype="uint8", ndim=3)
                  for i in usable]
        for index, image in zip(usable, images, strict=True):
            if image.shape != (size, size, 3):
                raise MessageError(f"aligned frame {messages[index].frame_id} is "
                                   f"{list(image.shape)}, the backbone needs [{size}, {size}, 3]")
        features = backbone.extract(np.stack(images)) if images else []
        for layer, tensor in enumerate(features):
            if not torch.isfinite(tensor).all():
                raise FeatureError(f"layer {layer + 1} features contain NaN or Inf")
        per_frame = 1000.0 * (time.perf_counter() - started) / len(messages)
        halves = [f.to(torch.float16).cpu().numpy() for f in features]
        out = []
        for index, message in enumerate(messages):
            row = usable.index(index) if index in usable else None
            body = {k: message.body[k] for k in ("valid", "warp", "status", "frame_shape")}
            body["features"] = [] if row is None else [pack_array(h[row]) for h in halves]
            body["backbone"] = backbone.spec.preprocessing_hash()
            result = message.derive("features", body)
            result.models["extract"] = self.model_version
            result.timings["extract"] = per_frame
            out.append(result)
        return out
