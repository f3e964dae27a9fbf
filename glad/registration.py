"""Registration of images on a model's reference image as `GladModel` does it (spec §6): the
images in the reference frame with their pixel validity, the training frames kept, the alignment
gates calibrated on them, and scores and heat maps taken back to each frame.

Plain functions on an `Aligner` (none when the model does not align); the model owns the
reference, the gates and the aligner, and decides when to drop them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from glad.align import Aligner, Alignment, rotation_and_scale, unwarp_heatmap
from glad.errors import DatasetError

log = logging.getLogger(__name__)

# Alignment gates (spec §6.3 step 5) are calibrated on the training frames: they are first aligned
# with the permissive gates, then the model keeps max(default, 1.5 x the largest training
# rotation) and min(default, 0.95 x the lowest training correlation), within these bounds.
PERMISSIVE_GATES = {"max_rotation_deg": 45.0, "min_correlation": 0.5}
DEFAULT_GATES = {"max_rotation_deg": 20.0, "min_correlation": 0.8}

Registered = tuple[list[np.ndarray], np.ndarray, list[Alignment | None]]


def register_images(images: Sequence[np.ndarray], size: int, aligner: Aligner | None,
                    reference: np.ndarray | None) -> Registered:
    """Images (at the input size `size`) aligned on `reference` by `aligner`, as they are when
    it is None; their validity (B, S, S) and alignments (None when not aligning). A frame that
    fails alignment stays in place with validity all False; its alignment carries the reason."""
    if aligner is None:
        return list(images), np.ones((len(images), size, size), dtype=bool), [None] * len(images)
    out, valid, alignments = [], [], []
    for image in images:
        result = aligner.align(image)
        alignments.append(result)
        if result.ok:  # out-of-frame pixels show the reference, and are masked anyway
            out.append(np.where(result.valid[..., None], result.aligned, reference))
            valid.append(result.valid)
        else:
            out.append(image)
            valid.append(np.zeros((size, size), dtype=bool))
    return out, np.stack(valid), alignments


def _fails_too_often(alignments: list[Alignment | None], budget: float) -> bool:
    """Whether more than `budget` (the model's false-alarm rate) of the training frames failed
    alignment. A frame that fails alignment is flagged as anomalous, so normal frames failing as
    often would spend more than the false-alarm budget on alignment alone: a part whose pose
    varies beyond the gates (swinging on a hook), or a rotation-symmetric part registered to a
    wrong angle (turned 180°). align="auto" then gives alignment up."""
    failed = [a.reason for a in alignments if a is not None and not a.ok]
    if not failed or len(failed) <= budget * len(alignments):
        return False
    log.warning("%d of %d training images failed alignment (e.g. %s): normal parts would be "
                "flagged more often than the false-alarm rate %.3g for that alone, so this model "
                "does not align", len(failed), len(alignments), failed[0], budget)
    return True


def _calibrated_gates(alignments: list[Alignment | None]) -> dict[str, float]:
    """The default gates widened to the pose spread of the aligned training frames
    (PERMISSIVE_GATES when none was aligned)."""
    accepted = [a for a in alignments if a is not None and a.ok]
    if not accepted:
        return dict(PERMISSIVE_GATES)
    rotation = max(abs(rotation_and_scale(a.warp)[0]) for a in accepted)
    correlation = min(a.correlation for a in accepted)
    return {
        "max_rotation_deg": float(np.clip(1.5 * rotation, DEFAULT_GATES["max_rotation_deg"],
                                          PERMISSIVE_GATES["max_rotation_deg"])),
        "min_correlation": float(np.clip(0.95 * correlation, PERMISSIVE_GATES["min_correlation"],
                                         DEFAULT_GATES["min_correlation"])),
    }


def _kept_frames(registered: Registered) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """The registered training images, their validity and their indices, without the frames
    that failed alignment (each one logged); fewer than 2 left is a `DatasetError`."""
    images, valid, alignments = registered
    keep = [i for i, a in enumerate(alignments) if a is None or a.ok]
    for alignment in alignments:
        if alignment is not None and not alignment.ok:
            log.warning("training image left out: %s", alignment.reason)
    if len(keep) < 2:
        raise DatasetError(f"only {len(keep)} of {len(images)} training images could be "
                           "aligned on the reference; fit with align=False for this product")
    return [images[i] for i in keep], valid[keep], np.array(keep)


@dataclass
class TrainingFrames:
    """The training images as the model fits on them: registered on `reference` (as they are
    when it is None), without the frames that failed alignment, and the alignment gates
    calibrated on them."""

    images: list[np.ndarray]
    valid: np.ndarray  # (M, S, S) pixel validity
    kept: np.ndarray  # their indices among the images given
    reference: np.ndarray | None
    gates: dict[str, float]


def register_training(images: Sequence[np.ndarray], size: int, aligner: Aligner | None,
                      reference: np.ndarray | None, auto: bool, far: float) -> TrainingFrames:
    """Training images (at the input size `size`) registered by `aligner` (built with
    PERMISSIVE_GATES) on `reference`. With `auto` (align="auto"), a product whose frames fail
    alignment more often than the false-alarm rate `far` is modelled without alignment instead
    (reference None)."""
    registered = register_images(images, size, aligner, reference)
    if auto and _fails_too_often(registered[2], far):
        reference = None
        registered = register_images(images, size, None, None)
    return TrainingFrames(*_kept_frames(registered), reference, _calibrated_gates(registered[2]))


def to_frames(scores: np.ndarray, maps: np.ndarray, alignments: list[Alignment | None]) -> list[str]:
    """Scores and heat maps (in the reference frame) of registered images as their frames get
    them, in place: a frame that failed alignment scores +inf with a blank map, the others' maps
    go back to the frame (for display and pixel metrics). Returns each frame's status ("ok" or
    why it was not scored)."""
    status = []
    for index, alignment in enumerate(alignments):
        if alignment is not None and not alignment.ok:
            scores[index], maps[index] = math.inf, 0.0
        elif alignment is not None:
            maps[index] = unwarp_heatmap(maps[index], alignment, maps[index].shape)
        status.append("ok" if alignment is None or alignment.ok else alignment.reason)
    return status
