"""The align stage: frames -> aligned. Registers each frame on the model's reference image.

Frames of any size and channel layout are accepted; the output is the frame resampled in the
reference frame at the model's input size, its pixel validity and the warp (for mapping heat maps
back). A frame that cannot be aligned travels on with its reason as `status`: the score stage
reports it as anomalous and unscored, it is not an error. Models without alignment (textures)
make this stage a resize.
"""

from __future__ import annotations

import time

from pipeline.schema import Message, pack_array, pack_mask, unpack_image
from stages._model import ModelStage


class AlignStage(ModelStage):
    name = "align"
    input = "frames"
    output = "aligned"

    def process(self, messages: list[Message]) -> list[Message]:
        started = time.perf_counter()
        images = [unpack_image(m.body["image"]) for m in messages]
        aligned, valid, alignments = self.model.register(images)
        per_frame = 1000.0 * (time.perf_counter() - started) / len(messages)
        out = []
        for message, image, picture, mask, alignment in zip(messages, images, aligned, valid,
                                                            alignments, strict=True):
            failed = alignment is not None and not alignment.ok
            body = {"image": pack_array(picture),
                    "valid": None if alignment is None else pack_mask(mask),
                    "warp": None if alignment is None or failed else pack_array(alignment.warp),
                    "status": alignment.reason if failed else "ok",
                    "frame_shape": list(image.shape[:2])}
            result = message.derive("aligned", body)
            result.models["align"] = self.model_version
            result.timings["align"] = per_frame
            out.append(result)
        return out
