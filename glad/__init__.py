"""GLAD (Global-to-Local Anomaly Detector) as a plain library: no Redis, no services.

Typical use::

    from glad import GladModel, read_image
    model = GladModel().fit([read_image(p) for p in train_paths])
    result = model.score([read_image(p) for p in test_paths])
    result.scores, result.heatmaps
"""

from glad.errors import (
    BackboneWeightsError,
    DatasetError,
    FeatureError,
    GladError,
    ImageError,
    ModelFileError,
    ModelMismatchError,
)
from glad.images import read_image
from glad.detector import ScoreResult
from glad.model import GladModel

__all__ = [
    "BackboneWeightsError",
    "DatasetError",
    "FeatureError",
    "GladError",
    "GladModel",
    "ImageError",
    "ModelFileError",
    "ModelMismatchError",
    "ScoreResult",
    "read_image",
]
