"""Model inputs that messages carry, checked against the model that will use them: the features
of a features message and the pixel validity of an aligned or features message. Shared by the
score stage and the online updater."""

from __future__ import annotations

import numpy as np

from glad.errors import ModelMismatchError
from pipeline.errors import MessageError
from pipeline.schema import Message, unpack_array


def message_features(model, message: Message) -> list[np.ndarray]:
    """A features message's per-layer float16 arrays (d, h, w), checked against `model`'s
    backbone and layers."""
    expected = model.backbone_.spec.preprocessing_hash()
    if message.body.get("backbone") != expected:
        raise ModelMismatchError(f"frame {message.frame_id}: features come from backbone "
                                 f"{message.body.get('backbone')!r}, the model needs {expected!r}")
    packed = message.body["features"]
    layers = model.layers_
    if len(packed) != len(layers):
        raise MessageError(f"frame {message.frame_id}: {len(packed)} feature layers, the model "
                           f"has {len(layers)}")
    out = []
    for index, (item, layer) in enumerate(zip(packed, layers, strict=True)):
        array = unpack_array(item, f"features[{index}]", dtype="float16", ndim=3)
        shape = (layer.mixture.means.shape[1], *layer.grid)
        if array.shape != shape:
            raise MessageError(f"frame {message.frame_id}: layer {index + 1} features are "
                               f"{list(array.shape)}, the model expects {list(shape)}")
        out.append(array)
    return out


def message_validity(message: Message, size: int) -> np.ndarray:
    """The pixel validity (S, S) a features or aligned message carries (all valid if none)."""
    if message.body["valid"] is None:
        return np.ones((size, size), dtype=bool)
    mask = unpack_array(message.body["valid"], "valid", dtype="bool", ndim=2)
    if mask.shape != (size, size):
        raise MessageError(f"frame {message.frame_id}: validity mask {list(mask.shape)}, "
                           f"expected [{size}, {size}]")
    return mask
