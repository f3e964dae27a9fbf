"""GLAD (Global-to-Local Anomaly Detector) as a plain library: no Redis, no services.

Typical use::

    from glad import GladModel, read_image
    model = GladModel().fit([read_image(p) for p in train_paths])
    result = model.score([read_image(p) for p in test_paths])
    result.scores, result.heatmaps

Names are imported lazily, so `import glad.synth` (or `glad --help`) does not load torch.
"""

from importlib import import_module

_EXPORTS = {
    "BackboneWeightsError": "glad.errors",
    "DatasetError": "glad.errors",
    "FeatureError": "glad.errors",
    "GladError": "glad.errors",
    "ImageError": "glad.errors",
    "ModelFileError": "glad.errors",
    "ModelMismatchError": "glad.errors",
    "NotFittedError": "glad.errors",
    "GladModel": "glad.model",
    "ScoreResult": "glad.detector",
    "read_image": "glad.images",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'glad' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
