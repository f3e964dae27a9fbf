"""Typed exceptions: every failure a user can cause has its own class and a one-line message."""


class GladError(Exception):
    """Base class of every error this library raises on purpose."""


class ImageError(GladError):
    """An image that cannot be used: unreadable, corrupt, truncated, wrong shape or too small."""


class DatasetError(GladError):
    """A dataset folder that is missing, empty or not laid out as expected."""


class BackboneWeightsError(GladError):
    """Pretrained weights for a backbone are not available offline."""


class FeatureError(GladError):
    """Features that cannot be modelled (NaN/Inf, wrong dimension)."""


class ModelFileError(GladError):
    """A model file that is missing, corrupt, of an unknown schema or failing its hash check."""


class ModelMismatchError(ModelFileError):
    """A model that was fitted with another backbone or preprocessing than the one asked for."""


class NotFittedError(GladError, RuntimeError):
    """A detector used (score, model_bytes) before `fit` was called on it."""
