"""Registration of object images onto one reference image (spec §6, the "align" stage).

GLAD compares every pixel position with the same position of the training images, so each object
frame is first warped onto a reference image. The OpenCV route of spec §6.3 is used:

1. both images are resized so that their longest side is `work_size` (the warp is rescaled to full
   resolution afterwards, §6.5);
2. a coarse warp comes from ORB features, Lowe's ratio test and a RANSAC similarity
   (`cv2.estimateAffinePartial2D`), robust to large motion and to defects; with too few inliers it
   falls back to a `cv2.phaseCorrelate` translation;
3. an inverse compositional Gauss-Newton (spec §6.1) refines it coarse to fine on a `cv2.pyrDown`
   pyramid, with ECC's objective (spec §6.2: the correlation coefficient, so a gain or offset
   change does not bias it) and a template-side mask (the reference ROI). Everything that depends
   on the reference alone (its blurred pyramid, gradients, steepest-descent images) is computed once
   per aligner, so a frame costs one warp and a few dot products per iteration; `cv2.findTransformECC`
   recomputes the reference side on every call and cannot mask the template in OpenCV 4.x;
4. a robust pass (an emulation of IRLS) masks pixels whose normalised residual is an outlier (a
   defect, an occluder) and refines the finest level without them (with the robust pass on, the
   pyramid of step 3 stops one level above the finest, which then runs once, masked); when the
   result strays far from a trusted feature-based warp, the robust refinement is also run from that
   warp and the better correlated result (outside the outliers) is kept;
5. quality gates (correlation, rotation, scale, translation, time) turn an implausible result into
   `ok=False` with a reason: an unexpected pose is itself abnormal and must not be scored.

Warps are 3x3 float64 and map reference pixel coordinates to frame pixel coordinates (x = column,
y = row, pixel centres at integers): frame(W x) ≈ reference(x).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from glad.errors import ImageError

MOTIONS = ("translation", "euclidean", "similarity", "affine", "homography")

_PARTIAL = ("translation", "euclidean", "similarity")  # motions a RANSAC similarity covers
MIN_SIDE = 32  # px: smaller images carry too little structure to register
MIN_STD = 2.0  # grey levels: a flatter image is blank
MIN_INLIERS = 15  # RANSAC inliers needed to trust the feature-based coarse warp
ORB_FAST_THRESHOLD = 5  # grey levels; the default 20 finds only ~50 corners on a smooth part
ORB_FEATURES = 300  # enough for RANSAC; brute-force matching costs O(n²)
RATIO = 0.75  # Lowe's ratio test
RANSAC_THRESHOLD = 3.0  # px at working resolution
# A trusted feature-based warp (RANSAC, 3 px threshold at working resolution) is within about a
# working pixel, well inside the capture range of the half-resolution level: start there.
TRUSTED_LEVEL = 1
# Gauss-Newton refinement (spec §6.1). A level ends when no corner of its image moved by more than
# GN_TOLERANCE px (at that level) in the last step: near the optimum a step shrinks the error about
# tenfold, and 0.01 instead of 0.05 px cost a verification step without changing any bench_align
# error. The coarser levels only have to land inside the finest level's capture range (a large
# defect, masked only at the finest level, can slow them to a crawl: 10 iterations gave the same
# accuracy as 30 on bench_align's cases, the phase-correlation fallback included). The finest level
# starts within a fraction of a working pixel (the next level's estimate): 1-3 steps.
GN_ITERATIONS = 10
GN_FINE_ITERATIONS = 5
GN_TOLERANCE = 0.05
VALIDITY_SLACK = 2  # px: the counted pixels keep this far inside the frame, renewed after such a move
CORRELATION_SLACK = 1e-5  # a drop this small is rounding (float32 sums), not an overshoot
GRADIENT_MARGIN = 2  # px at each level's border, where the blur and gradient see the padding
BLUR = 5  # Gaussian pre-blur of both images at every level (ECC's gaussFiltSize), also for the NCC
OUTLIER_SIGMAS = 3.0
OUTLIER_DILATION = 5  # px
MIN_OUTLIER_Z = 0.3  # floor of the outlier threshold, in reference standard deviations
MEDIAN_STRIDE = 16  # robust statistics of the residual on every 16th region pixel (see _outliers)
OUTLIER_FRACTION = (0.002, 0.25)  # robust pass only when this share of the ROI is masked
MIN_VALID_FRACTION = 0.9
# px at working resolution (largest corner distance): a refinement this far from a trusted coarse warp
# gets a second opinion, the robust refinement started from the coarse warp (see `Aligner._estimate`)
DIVERGENCE = 10.0


@dataclass
class Alignment:
    """The result of aligning one frame on the reference.

    `warp` maps reference pixel coordinates to frame pixel coordinates (frame(W x) ≈ reference(x));
    it is the identity when the frame was rejected before any estimate. `aligned` (RGB uint8) and
    `valid` (bool, pixels that came from inside the frame, eroded by 1 px) live in the reference
    frame and size; they are None when no warp could be estimated. `reason` is "" when `ok`.
    """

    warp: np.ndarray
    aligned: np.ndarray | None
    valid: np.ndarray | None
    correlation: float
    ok: bool
    reason: str
    reference_shape: tuple[int, int]
    warnings: list[str] = field(default_factory=list)


class _Failure(Exception):
    """Internal: stops an alignment with a reason (never leaves `Aligner.align`)."""


class Aligner:
    """Aligns frames on one reference image; build once per category, call `align` per frame."""

    def __init__(
        self,
        reference: np.ndarray,
        motion: str = "euclidean",
        mask: np.ndarray | None = None,
        work_size: int = 256,
        levels: int = 3,
        min_correlation: float = 0.8,
        max_rotation_deg: float = 20.0,
        scale_range: tuple[float, float] = (0.9, 1.1),
        max_translation_frac: float = 0.25,
        robust: bool = True,
        max_seconds: float = 1.0,
    ) -> None:
        if motion not in MOTIONS:
            raise ValueError(f"unknown motion {motion!r}: one of {MOTIONS}")
        if work_size < MIN_SIDE or levels < 1:
            raise ValueError(f"work_size must be >= {MIN_SIDE} and levels >= 1")
        gray = _check_reference(reference)
        if mask is not None and mask.shape != gray.shape:
            raise ImageError(f"mask shape {mask.shape} differs from the reference {gray.shape}")
        self.motion = motion
        self.work_size = work_size
        self.min_correlation = min_correlation
        self.max_rotation_deg = max_rotation_deg
        self.scale_range = scale_range
        self.max_translation_frac = max_translation_frac
        self.robust = robust
        self.max_seconds = max_seconds
        self.shape = gray.shape
        self._ref_work, self._ref_scale = _to_work(gray, work_size)
        self._levels = _usable_levels(self._ref_work.shape, levels)
        full_roi = np.ones(gray.shape, np.uint8) if mask is None else mask.astype(np.uint8)
        roi = cv2.resize(full_roi, self._ref_work.shape[::-1], interpolation=cv2.INTER_NEAREST)
        self._roi = roi.astype(bool)
        self._full_roi = cv2.resize(roi, gray.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
        # the reference side of the refinement, once per aligner (spec §6.1: "precompute once per scale")
        self._templates = [_template(level, motion) for level in _pyramid(self._ref_work, self._levels)]
        self._roi_pyramid = _mask_pyramid(self._roi, self._levels)
        self._ref_smooth = self._templates[0].image
        self._coarse = _CoarseEstimator(self._ref_work, roi, motion, self._project)

    def align(self, frame: np.ndarray) -> Alignment:
        """Register `frame` (RGB or grey uint8, any size) on the reference; never raises for bad input.

        Rejections before any estimate (bad type, tiny, blank, no convergence, timeout) return the
        identity warp and no aligned image; gate failures keep the estimate for inspection.
        """
        start = time.perf_counter()
        warnings: list[str] = []
        try:
            gray = _check_frame(frame)
            image, frame_scale = _to_work(gray, self.work_size)
            work = _WorkFrame(image, self._levels, self._ref_smooth, self._roi)
            warp_work = self._estimate(work, start, warnings)
        except _Failure as failure:
            return Alignment(np.eye(3), None, None, 0.0, False, f"alignment_failed: {failure}",
                             self.shape, warnings)
        warp = frame_scale @ warp_work @ np.linalg.inv(self._ref_scale)
        correlation = work.correlation(warp_work)
        reason = self._gate(warp, gray.shape, correlation)
        aligned, valid = self._warp_frame(frame, warp, warnings)
        return Alignment(warp, aligned, valid, correlation, not reason,
                         f"alignment_failed: {reason}" if reason else "", self.shape, warnings)

    # ---------------------------------------------------------------------------------------
    # Estimation at working resolution
    # ---------------------------------------------------------------------------------------

    def _estimate(self, work: _WorkFrame, start: float, warnings: list[str]) -> np.ndarray:
        """Coarse, pyramidal and robust estimation of the working-resolution warp.

        The pyramid starts at the level that `_first_level` picks for the coarse estimate. With the
        robust pass on, it stops one level above the finest, and the finest (costliest) level runs
        once, masked by the outliers found at that estimate (or unmasked when the pass is skipped).
        When the result strays far from a trusted feature-based estimate (a defect can drag the
        first levels), the robust refinement is also started from the coarse estimate and the
        better correlated one is kept.
        """
        coarse, trusted = self._coarse.estimate(work.image)
        self._check_time(start)
        split = self.robust and self._levels > 1
        warp, converged = self._refine_pyramid(work, coarse, start, 1 if split else 0,
                                               coarsest=self._first_level(trusted))
        strayed = _corner_shift(coarse, warp, work.image.shape)
        if split:
            robust, _ = self._robust_pass(work, warp, start, iterations=GN_FINE_ITERATIONS)
            if robust is None:
                robust = self._refine(work, 0, warp, self._roi_pyramid[0], GN_FINE_ITERATIONS)
            if robust is not None:
                warp, converged = robust, True
        if not converged:
            if not trusted:
                raise _Failure("no convergence")
            warnings.append("refinement_failed: kept the coarse feature-based estimate")
        if self.robust and not split:
            robust, _ = self._robust_pass(work, warp, start)
            warp = warp if robust is None else robust
        strayed = max(strayed, _corner_shift(coarse, warp, work.image.shape))
        if self.robust and trusted and strayed > DIVERGENCE:
            warp = self._second_opinion(work, coarse, warp, start)
        return warp

    def _second_opinion(self, work: _WorkFrame, coarse: np.ndarray, warp: np.ndarray,
                        start: float) -> np.ndarray:
        """Robust refinement started from the coarse estimate; the better of the two is kept.

        The comparison uses the correlation outside the outliers of both estimates.
        """
        alternative, outliers = self._robust_pass(work, coarse, start, pyramid=self._first_level(True))
        if alternative is None:
            return warp
        keep = self._roi & ~(outliers | work.outliers(warp))
        if work.correlation(alternative, keep) > work.correlation(warp, keep):
            return alternative
        return warp

    def _first_level(self, trusted: bool) -> int:
        """The pyramid level to start refining at: the coarsest, or TRUSTED_LEVEL (when it exists)
        for a trusted feature-based estimate, which is already within about a working pixel."""
        return min(self._levels - 1, TRUSTED_LEVEL) if trusted else self._levels - 1

    def _refine_pyramid(self, work: _WorkFrame, warp: np.ndarray, start: float,
                        finest: int, coarsest: int,
                        rois: list[np.ndarray] | None = None) -> tuple[np.ndarray, bool]:
        """Refine from level `coarsest` down to `finest`; a level that fails keeps the current warp."""
        rois = self._roi_pyramid if rois is None else rois
        converged = False
        for level in range(coarsest, finest - 1, -1):
            refined = self._refine(work, level, warp, rois[level])
            if refined is not None:
                warp, converged = refined, True
            self._check_time(start)
        return warp, converged

    def _robust_pass(self, work: _WorkFrame, warp: np.ndarray, start: float,
                     pyramid: int | None = None,
                     iterations: int = GN_ITERATIONS) -> tuple[np.ndarray | None, np.ndarray]:
        """Refine the finest level without the pixels whose residual is an outlier (defects).

        Returns (refined warp or None, outlier mask). None when almost nothing or too much is
        masked (then it is misfit, not a defect), when the refinement fails, or when the new warp
        does not correlate better than `warp` on the pixels that are not outliers. With `pyramid`
        (a level), every level from that one down runs masked (for a start a few pixels off).
        """
        region = self._roi & work.view(warp)[1]
        outliers = work.outliers(warp)
        low, high = OUTLIER_FRACTION
        if not low * region.sum() <= outliers.sum() <= high * region.sum():
            return None, outliers
        keep = self._roi & ~outliers
        if pyramid is not None:
            refined, converged = self._refine_pyramid(work, warp, start, 0, pyramid,
                                                      _mask_pyramid(keep, self._levels))
            refined = refined if converged else None
        else:
            refined = self._refine(work, 0, warp, keep, iterations)
        self._check_time(start)
        if refined is None or work.correlation(refined, keep) <= work.correlation(warp, keep):
            return None, outliers
        return refined, outliers

    def _refine(self, work: _WorkFrame, level: int, warp: np.ndarray, roi: np.ndarray,
                iterations: int = GN_ITERATIONS) -> np.ndarray | None:
        """Gauss-Newton at pyramid `level` on the reference pixels of `roi` (spec §6.1).

        `warp` (level 0) is conjugated to the level (pyrDown: coarse pixel c is fine pixel 2c,
        spec §6.3 step 3), refined and returned at level 0; None when the refinement fails. At
        level 0 the first iteration reuses the view of `warp` when this call already made it.
        """
        scale = np.diag([2.0**level, 2.0**level, 1.0])
        view = work.made_view(warp) if level == 0 else None
        refined = _gauss_newton(self._templates[level], work.pyramid[level],
                                np.linalg.inv(scale) @ warp @ scale, roi, iterations, view)
        if refined is None:
            return None
        projected = self._project(scale @ refined @ np.linalg.inv(scale))
        return projected if _invertible(projected) else None

    def _project(self, warp: np.ndarray) -> np.ndarray:
        """The nearest warp of this aligner's motion family (working resolution)."""
        return _project(warp, self.motion, _centre(self._ref_work.shape))

    # ---------------------------------------------------------------------------------------
    # Gates and outputs
    # ---------------------------------------------------------------------------------------

    def _gate(self, warp: np.ndarray, frame_shape: tuple[int, int], correlation: float) -> str:
        """The first failed quality gate (rotation, scale, centre shift, correlation), or ""."""
        rotation, scale = rotation_and_scale(warp)
        low, high = self.scale_range
        shift = _apply(warp, _centre(self.shape)) - _centre(frame_shape)
        limit = self.max_translation_frac * np.array(self.shape[::-1], dtype=float)
        if abs(rotation) > self.max_rotation_deg:
            return f"rotation {abs(rotation):.1f}° > {self.max_rotation_deg:g}°"
        if not low <= scale <= high:
            return f"scale {scale:.2f} outside [{low:g}, {high:g}]"
        if np.any(np.abs(shift) > limit):
            return (f"translation ({shift[0]:.0f}, {shift[1]:.0f}) px beyond "
                    f"{self.max_translation_frac:g} of the reference size")
        if correlation < self.min_correlation:
            return f"correlation {correlation:.2f} < {self.min_correlation:.2f}"
        return ""

    def _check_time(self, start: float) -> None:
        elapsed = time.perf_counter() - start
        if elapsed > self.max_seconds:
            raise _Failure(f"timeout after {elapsed:.2f} s > {self.max_seconds:g} s")

    def _warp_frame(self, frame: np.ndarray, warp: np.ndarray,
                    warnings: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The frame resampled in the reference frame, and its validity mask (spec §6.4).

        The frame's edge is continued beyond it: the validity mask's erosion sees nothing past
        the reference's own border, so a frame off by a fraction of a pixel keeps its first row
        or column valid, and with a zero border that row blended black in, a dark line the model
        scored as a defect (the worst false alarms of a default `glad run`, up to 4x the median
        normal score).
        """
        rgb = np.repeat(frame[..., None], 3, axis=2) if frame.ndim == 2 else frame[..., :3]
        aligned = _warp(np.ascontiguousarray(rgb), warp, self.shape, cv2.INTER_LINEAR,
                        cv2.BORDER_REPLICATE)
        valid = _valid(frame.shape, warp, self.shape)
        roi = self._full_roi
        fraction = valid[roi].mean() if roi.any() else valid.mean()
        if fraction < MIN_VALID_FRACTION:
            warnings.append(f"valid ROI fraction {fraction:.2f} < {MIN_VALID_FRACTION}")
        return aligned, valid


# ---------------------------------------------------------------------------------------------
# Coarse estimate (spec §6.3 step 2) and a frame at working resolution
# ---------------------------------------------------------------------------------------------


class _CoarseEstimator:
    """The coarse warp (reference -> frame, working resolution) that the refinement starts from.

    Everything it needs of the reference (ORB keypoints and descriptors within the ROI, the working
    grey for phase correlation) is computed once, with the aligner. `motion` picks the RANSAC model
    and `project` is the aligner's projection onto that motion family.
    """

    def __init__(self, reference: np.ndarray, roi: np.ndarray, motion: str,
                 project: Callable[[np.ndarray], np.ndarray]) -> None:
        self._reference = reference
        self._motion = motion
        self._project = project
        self._orb = cv2.ORB_create(nfeatures=ORB_FEATURES, fastThreshold=ORB_FAST_THRESHOLD)
        self._matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
        self._keypoints, self._descriptors = self._orb.detectAndCompute(_as_uint8(reference), roi)

    def estimate(self, work: np.ndarray) -> tuple[np.ndarray, bool]:
        """Feature-based warp (reference -> frame) or, failing that, a phase-correlation shift.

        RANSAC fits a similarity for the motions it contains and a full affinity otherwise (shear
        would cost a similarity its inliers); the result is projected onto the motion family. The
        flag says whether the estimate rests on enough RANSAC inliers to be kept on its own.
        """
        keypoints, descriptors = self._orb.detectAndCompute(_as_uint8(work), None)
        if descriptors is not None and self._descriptors is not None and len(keypoints) >= 2:
            pairs = self._matcher.knnMatch(self._descriptors, descriptors, k=2)
            good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < RATIO * p[1].distance]
            if len(good) >= MIN_INLIERS:
                src = np.float32([self._keypoints[m.queryIdx].pt for m in good])
                dst = np.float32([keypoints[m.trainIdx].pt for m in good])
                estimate = cv2.estimateAffinePartial2D if self._motion in _PARTIAL else cv2.estimateAffine2D
                cv2.setRNGSeed(0)  # RANSAC draws from OpenCV's global RNG: same frame, same warp
                matrix, inliers = estimate(src, dst, method=cv2.RANSAC,
                                           ransacReprojThreshold=RANSAC_THRESHOLD)
                if matrix is not None and int(inliers.sum()) >= MIN_INLIERS:
                    coarse = self._project(np.vstack([matrix, [0.0, 0.0, 1.0]]))
                    if _invertible(coarse):
                        return coarse, True
        return self._project(self._phase_shift(work)), False

    def _phase_shift(self, work: np.ndarray) -> np.ndarray:
        """Translation by phase correlation, the frame cropped or zero-padded to the reference's shape."""
        h, w = self._reference.shape
        canvas = np.zeros((h, w), np.float32)
        crop = work[:h, :w]
        canvas[: crop.shape[0], : crop.shape[1]] = crop
        window = cv2.createHanningWindow((w, h), cv2.CV_32F)
        # a copy: cv2.phaseCorrelate applies the window to its inputs in place
        (dx, dy), _ = cv2.phaseCorrelate(self._reference.copy(), canvas, window)
        return _translation(dx, dy)


class _WorkFrame:
    """One frame at working resolution during one `Aligner.align` call, and how warps place it.

    `image` is its working grey, `pyramid` the pre-blurred pyramid the refinement samples. A warp's
    view on the reference (warped frame and validity mask) and its outliers are made once per warp
    and kept while the call lasts, since gates and comparisons revisit warps; dropping the object
    drops them, so no frame's data outlives its call.
    """

    def __init__(self, image: np.ndarray, levels: int, reference: np.ndarray, roi: np.ndarray) -> None:
        self.image = image
        self.pyramid = [_smooth(level) for level in _pyramid(image, levels)]
        self._reference = reference  # the pre-blurred working reference
        self._roi = roi  # the reference ROI at working resolution
        self._views: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}
        self._outliers: dict[bytes, np.ndarray] = {}

    def view(self, warp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The pre-blurred working frame warped onto the reference, and its validity mask."""
        key = warp.tobytes()
        if key not in self._views:
            self._views[key] = (_warp(self.pyramid[0], warp, self._reference.shape, cv2.INTER_LINEAR),
                                _valid(self.pyramid[0].shape, warp, self._reference.shape))
        return self._views[key]

    def made_view(self, warp: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The `view` of `warp` when it was already made, else None (without making it)."""
        return self._views.get(warp.tobytes())

    def outliers(self, warp: np.ndarray) -> np.ndarray:
        """Outlier blobs of the residual under `warp` (see `_outliers`)."""
        key = warp.tobytes()
        if key not in self._outliers:
            aligned, valid = self.view(warp)
            self._outliers[key] = _outliers(self._reference, aligned, self._roi & valid)
        return self._outliers[key]

    def correlation(self, warp: np.ndarray, roi: np.ndarray | None = None) -> float:
        """Zero-mean normalised cross-correlation of the aligned and reference greys.

        Computed on the valid pixels of `roi` (default: the reference ROI), after the pre-blur.
        """
        aligned, valid = self.view(warp)
        region = (self._roi if roi is None else roi) & valid
        if region.sum() < 16:
            return 0.0
        return _ncc(self._reference[region], aligned[region])


# ---------------------------------------------------------------------------------------------
# Public helpers
# ---------------------------------------------------------------------------------------------


def unwarp_heatmap(heatmap: np.ndarray, alignment: Alignment, frame_shape: tuple[int, int],
                   fill: float | None = None) -> np.ndarray:
    """Map a heat map of the reference frame back onto the original frame (spec §6.6).

    The map is resized to the reference size first (it may come at feature or 256 resolution);
    frame pixels without a pre-image in the reference get `fill` (default: the map's minimum, the
    least anomalous score). Returns float32 (or float64 for a float64 map) of `frame_shape`.
    """
    dtype = np.float64 if heatmap.dtype == np.float64 else np.float32
    h_ref, w_ref = alignment.reference_shape
    resized = cv2.resize(heatmap.astype(dtype), (w_ref, h_ref), interpolation=cv2.INTER_LINEAR)
    value = float(np.min(heatmap)) if fill is None else float(fill)
    # Without WARP_INVERSE_MAP: dst(y) = src(W⁻¹ y), i.e. the frame pixel y shows reference W⁻¹ y.
    return cv2.warpPerspective(resized, alignment.warp, (frame_shape[1], frame_shape[0]),
                               flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=value)


def select_reference(images: Sequence[np.ndarray]) -> int:
    """Index of the training image most similar to the others, the natural alignment target.

    Each image is reduced to a blurred 64x64 grey; the one with the highest normalised
    correlation to the pixel-wise median of all of them wins. O(n) and cheap.
    """
    if len(images) == 0:
        raise ValueError("select_reference needs at least one image")
    small = np.stack([_smooth(cv2.resize(_gray(image), (64, 64), interpolation=cv2.INTER_AREA))
                      for image in images])
    median = np.median(small, axis=0)
    scores = [_ncc(s.ravel(), median.ravel()) for s in small]
    return int(np.argmax(scores))


def object_mask(reference: np.ndarray, dilation: int = 12,
                fraction_range: tuple[float, float] = (0.05, 0.98)) -> np.ndarray:
    """Automatic object ROI in the reference frame (spec §4.4): the part against its background.

    The background level is the median of the image border; pixels that differ from it (Otsu on
    the blurred absolute difference) form the part, whose holes are filled before it is dilated
    by `dilation` px. When the part is indistinct (outside `fraction_range` of the image), the
    whole image is returned.
    """
    gray = _gray(reference)
    border = np.concatenate([gray[:2].ravel(), gray[-2:].ravel(), gray[:, :2].ravel(),
                             gray[:, -2:].ravel()])
    difference = cv2.GaussianBlur(np.abs(gray - np.median(border)), (5, 5), 0)
    _, part = cv2.threshold(_as_uint8(difference), 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    part = cv2.morphologyEx(part, cv2.MORPH_CLOSE, np.ones((9, 9), np.uint8))
    outside = np.zeros((part.shape[0] + 2, part.shape[1] + 2), np.uint8)
    filled = part.copy()
    cv2.floodFill(filled, outside, (0, 0), 1)  # what the flood reaches from the corner is outside
    part = part | (1 - filled)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilation + 1,) * 2)
    mask = cv2.dilate(part, kernel) > 0
    if not fraction_range[0] <= mask.mean() <= fraction_range[1]:
        return np.ones(mask.shape, dtype=bool)
    return mask


def random_warp(motion: str, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A random reference -> frame warp of `motion` about the image centre: within ±8°, ±12 px,
    ±4 % scale (similarity and up), ±3 % shear (affine, homography) and a slight perspective;
    the known transforms that tests and bench/bench_align.py recover."""
    angle = 0.0 if motion == "translation" else np.radians(rng.uniform(-8, 8))
    scale = rng.uniform(0.96, 1.04) if motion in ("similarity", "affine", "homography") else 1.0
    linear = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    if motion in ("affine", "homography"):
        linear = linear @ (np.eye(2) + rng.uniform(-0.03, 0.03, (2, 2)))
    centre = np.full(2, (size - 1) / 2)
    warp = np.eye(3)
    warp[:2, :2] = linear
    warp[:2, 2] = centre + rng.uniform(-12, 12, 2) - linear @ centre
    if motion == "homography":
        warp[2, :2] = rng.uniform(-1e-4, 1e-4, 2)
    return warp


def random_pose(image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator,
                max_rotation_deg: float = 10.0,
                max_shift_px: float = 16.0) -> tuple[np.ndarray, np.ndarray | None]:
    """The randomised-pose protocol (spec §8.3): one random rotation about the centre and shift.

    Rotation ~ U[-max_rotation_deg, max_rotation_deg], shift ~ U[-s, s]² with s = max_shift_px
    scaled by size/256. The image uses bilinear interpolation and border replication; the mask
    (same transform) nearest interpolation and a zero border, and keeps its dtype.
    """
    h, w = image.shape[:2]
    angle = rng.uniform(-max_rotation_deg, max_rotation_deg)
    shift = rng.uniform(-1.0, 1.0, size=2) * max_shift_px * max(h, w) / 256.0
    matrix = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), angle, 1.0)
    matrix[:, 2] += shift
    moved = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    if mask is None:
        return moved, None
    moved_mask = cv2.warpAffine(mask.astype(np.uint8), matrix, (w, h), flags=cv2.INTER_NEAREST,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return moved, moved_mask.astype(mask.dtype)


# ---------------------------------------------------------------------------------------------
# Image and warp utilities
# ---------------------------------------------------------------------------------------------


def _check_reference(reference: np.ndarray) -> np.ndarray:
    """The reference's grey (`_gray`); raise ImageError when it cannot anchor an alignment."""
    try:
        return _check_frame(reference)
    except _Failure as failure:
        raise ImageError(f"unusable reference image: {failure}") from None


def _check_frame(frame: np.ndarray) -> np.ndarray:
    """The frame's grey (`_gray`); reject frames that are not uint8 images, too small or blank."""
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8:
        raise _Failure(f"unsupported image type {getattr(frame, 'dtype', type(frame))} (need uint8)")
    if frame.ndim not in (2, 3) or (frame.ndim == 3 and frame.shape[2] not in (1, 3, 4)):
        raise _Failure(f"unsupported image shape {frame.shape}")
    if min(frame.shape[:2]) < MIN_SIDE:
        raise _Failure(f"image too small {frame.shape[1]}x{frame.shape[0]} (< {MIN_SIDE} px)")
    gray = _gray(frame)
    if float(cv2.meanStdDev(gray)[1][0, 0]) < MIN_STD:
        raise _Failure("blank frame")
    return gray


def _gray(image: np.ndarray) -> np.ndarray:
    """Grey float32 in 0-255 (the same conversion for reference and frames)."""
    if image.ndim == 2 or image.shape[2] == 1:
        return image.reshape(image.shape[:2]).astype(np.float32)
    return cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2GRAY).astype(np.float32)


def _as_uint8(gray: np.ndarray) -> np.ndarray:
    return np.clip(gray, 0, 255).astype(np.uint8)


def _smooth(gray: np.ndarray) -> np.ndarray:
    """The Gaussian pre-blur of both images at every level (ECC's gaussFiltSize), also for the NCC."""
    return cv2.GaussianBlur(gray, (BLUR, BLUR), 0)


def _to_work(gray: np.ndarray, work_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize so that the longest side is `work_size`; also return T with full = T · work (§6.5).

    T includes cv2.resize's pixel-centre convention: x_full = f·x_work + (f − 1)/2 per axis.
    """
    h, w = gray.shape
    factor = work_size / max(h, w)
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    work = gray if size == (w, h) else cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
    fx, fy = w / size[0], h / size[1]
    return work, np.array([[fx, 0.0, (fx - 1) / 2], [0.0, fy, (fy - 1) / 2], [0.0, 0.0, 1.0]])


def _usable_levels(shape: tuple[int, int], levels: int) -> int:
    """At most `levels` pyramid levels, keeping the coarsest side at >= 32 px."""
    return max(1, min(levels, 1 + int(math.log2(min(shape) / MIN_SIDE))))


def _pyramid(gray: np.ndarray, levels: int) -> list[np.ndarray]:
    """cv2.pyrDown pyramid: coarse pixel c is fine pixel 2c (spec §6.3 step 3)."""
    pyramid = [gray]
    for _ in range(levels - 1):
        pyramid.append(cv2.pyrDown(pyramid[-1]))
    return pyramid


def _mask_pyramid(mask: np.ndarray, levels: int) -> list[np.ndarray]:
    """A boolean mask at each level (even samples, as pyrDown keeps)."""
    return [mask[:: 2**level, :: 2**level] for level in range(levels)]


def _centre(shape: tuple[int, ...]) -> np.ndarray:
    return np.array([(shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0])


def _apply(warp: np.ndarray, point: np.ndarray) -> np.ndarray:
    x, y, z = warp @ np.array([point[0], point[1], 1.0])
    return np.array([x / z, y / z])


def _translation(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def _corner_shift(a: np.ndarray, b: np.ndarray, shape: tuple[int, int]) -> float:
    """Largest distance between the images of the four corners of `shape` under two warps."""
    h, w = shape
    corners = np.array([[0, w - 1, 0, w - 1], [0, 0, h - 1, h - 1], [1, 1, 1, 1]], float)
    pa, pb = a @ corners, b @ corners
    return float(np.max(np.linalg.norm(pa[:2] / pa[2] - pb[:2] / pb[2], axis=0)))


def _invertible(warp: np.ndarray) -> bool:
    """Finite and far from singular (a collapsed warp is no registration)."""
    return bool(np.all(np.isfinite(warp)) and abs(np.linalg.det(warp[:2, :2])) > 1e-3 and warp[2, 2] != 0)


def rotation_and_scale(warp: np.ndarray) -> tuple[float, float]:
    """Rotation (degrees) and isotropic scale of the linear part of a warp."""
    linear = warp[:2, :2] / warp[2, 2]
    angle = math.degrees(math.atan2(linear[1, 0] - linear[0, 1], linear[0, 0] + linear[1, 1]))
    return angle, math.sqrt(abs(np.linalg.det(linear)))


def _project(warp: np.ndarray, motion: str, centre: np.ndarray) -> np.ndarray:
    """The nearest warp of the motion family, keeping the image of `centre`."""
    if motion == "homography":
        return warp
    if motion == "affine":
        return np.vstack([warp[:2] / warp[2, 2], [0.0, 0.0, 1.0]])
    linear = warp[:2, :2] / warp[2, 2]
    if motion == "translation":
        linear = np.eye(2)
    else:
        a = (linear[0, 0] + linear[1, 1]) / 2
        b = (linear[1, 0] - linear[0, 1]) / 2
        if motion == "euclidean":
            norm = math.hypot(a, b)
            a, b = (a / norm, b / norm) if norm > 0 else (1.0, 0.0)
        linear = np.array([[a, -b], [b, a]])
    shift = _apply(warp, centre) - linear @ centre
    return np.vstack([np.hstack([linear, shift[:, None]]), [0.0, 0.0, 1.0]])


def _warp(image: np.ndarray, warp: np.ndarray, shape: tuple[int, int], interpolation: int,
          border: int = cv2.BORDER_CONSTANT) -> np.ndarray:
    """Resample `image` (frame) in the reference frame: out(x) = image(W x), zero outside (or
    the frame's edge continued, `border=cv2.BORDER_REPLICATE`)."""
    return cv2.warpPerspective(image, warp, (shape[1], shape[0]),
                               flags=interpolation | cv2.WARP_INVERSE_MAP,
                               borderMode=border, borderValue=0)


def _valid(source_shape: tuple[int, ...], warp: np.ndarray, shape: tuple[int, int],
           margin: int = 1) -> np.ndarray:
    """Pixels of the reference frame whose bilinear sample lies inside the source (spec §6.4).

    An all-ones image warped with nearest interpolation and a zero border, eroded by `margin` px:
    the 1 px support of bilinear interpolation, plus any motion the warp may still make.
    """
    return _erode(_warp(np.ones(source_shape[:2], np.uint8), warp, shape, cv2.INTER_NEAREST), margin)


def _erode(mask: np.ndarray, margin: int) -> np.ndarray:
    """A boolean or 0/1 uint8 mask eroded by `margin` px (square kernel; successive erosions add
    up, so a `_valid` mask eroded by m more equals one computed with margin + m)."""
    kernel = np.ones((2 * margin + 1,) * 2, np.uint8)
    return cv2.erode(mask.view(np.uint8), kernel).astype(bool)


# ---------------------------------------------------------------------------------------------
# Inverse compositional Gauss-Newton refinement (spec §6.1 with ECC's objective, §6.2)
# ---------------------------------------------------------------------------------------------


def _unit(row: int, col: int) -> np.ndarray:
    """The 3x3 matrix unit E_(row, col)."""
    unit = np.zeros((3, 3))
    unit[row, col] = 1.0
    return unit


# Generators B_k of each motion family in normalised coordinates: an increment is I + Σ p_k B_k
# (the parametrisations of spec §6.1; a Euclidean increment is projected back onto a rotation).
_SHIFTS = [_unit(0, 2), _unit(1, 2)]
_ROTATION = _unit(1, 0) - _unit(0, 1)
_LINEAR = [_unit(0, 0), _unit(0, 1), _unit(1, 0), _unit(1, 1)]
_GENERATORS = {
    "translation": _SHIFTS,
    "euclidean": [*_SHIFTS, _ROTATION],
    "similarity": [*_SHIFTS, _unit(0, 0) + _unit(1, 1), _ROTATION],
    "affine": [*_SHIFTS, *_LINEAR],
    "homography": [*_SHIFTS, *_LINEAR, _unit(2, 0), _unit(2, 1)],
}


@dataclass(frozen=True)
class _Template:
    """One pyramid level of the reference, prepared once per aligner for `_gauss_newton`.

    `image` is the pre-blurred reference (float32), `steepest` its steepest-descent images
    G_k = ∇I₁ · ∂W/∂p_k (one flattened row per parameter of `motion`) and `sparse` the same on every
    other row and column, enough for the Hessian (`_hessian`). `generators` holds the flattened
    B_k of the motion. `normalise` maps pixel to normalised coordinates (centre 0, half the longest
    side 1, which keeps the Hessian well conditioned), `to_pixels` back; `interior` excludes the
    border where the blur and gradient see padding.
    """

    motion: str
    image: np.ndarray
    steepest: np.ndarray
    sparse: np.ndarray
    generators: np.ndarray
    normalise: np.ndarray
    to_pixels: np.ndarray
    interior: np.ndarray


def _template(reference: np.ndarray, motion: str) -> _Template:
    """The `_Template` of one level of the (unblurred) working reference."""
    image = _smooth(reference)
    h, w = image.shape
    half = max(h, w) / 2.0
    normalise = np.array([[1 / half, 0.0, -(w - 1) / (2 * half)],
                          [0.0, 1 / half, -(h - 1) / (2 * half)], [0.0, 0.0, 1.0]])
    rows, cols = np.mgrid[0:h, 0:w]
    points = normalise @ np.stack([cols.ravel(), rows.ravel(), np.ones(h * w)])
    # Sobel / 8 is the derivative in grey levels per pixel; times `half`, per normalised unit
    gx, gy = (cv2.Sobel(image, cv2.CV_32F, dx, 1 - dx, ksize=3, scale=half / 8).ravel() for dx in (1, 0))
    steepest = []
    for generator in _GENERATORS[motion]:
        moved = generator @ points  # derivative of the homogeneous image; then of its projection
        steepest.append(gx * (moved[0] - points[0] * moved[2]) + gy * (moved[1] - points[1] * moved[2]))
    steepest = np.array(steepest, np.float32)
    sparse = np.ascontiguousarray(steepest.reshape(-1, h, w)[:, ::2, ::2].reshape(len(steepest), -1))
    interior = np.zeros((h, w), bool)
    interior[GRADIENT_MARGIN:h - GRADIENT_MARGIN, GRADIENT_MARGIN:w - GRADIENT_MARGIN] = True
    generators = np.array([g.ravel() for g in _GENERATORS[motion]])
    return _Template(motion, image, steepest, sparse, generators, normalise, np.linalg.inv(normalise),
                     interior)


@dataclass(frozen=True)
class _Fit:
    """The template side of the normal equations on one set of counted pixels (weights w in {0, 1}).

    With t̄ the template and ā the warped frame, both centred on the counted pixels, and G_c the
    centred steepest-descent images, Σ w G_c t̄ = G·(w t̄) and Σ w G_c ā = G·(w ā) (centred images
    need no centred G): the first is fixed while the set is, so an iteration makes a single pass
    of G over the image.
    """

    weights: np.ndarray
    count: float
    centred: np.ndarray  # w t̄, flattened
    norm: float  # ‖w t̄‖
    steepest_centred: np.ndarray  # G·(w t̄)
    hessian: np.ndarray  # Σ w G_c G_cᵀ


def _fit(template: _Template, counted: np.ndarray, previous: _Fit | None = None) -> _Fit | None:
    """The `_Fit` of the pixels `counted` (bool image); None when too few or the template is flat.

    Given the `previous` fit of the same level (the counted set moved by a few border pixels), its
    Hessian is rescaled to the new count instead of recomputed: inverse compositional's constant
    Hessian (spec §6.1), which only scales the step.
    """
    weights = counted.ravel().astype(np.float32)
    count = float(weights.sum())
    if count < 16 * len(template.steepest):
        return None
    image = template.image.ravel()
    centred = weights * (image - float(weights @ image) / count)
    norm = math.sqrt(float(centred @ centred))
    if norm < MIN_STD * math.sqrt(count):
        return None
    hessian = _hessian(template, weights) if previous is None else previous.hessian * (count / previous.count)
    return _Fit(weights, count, centred, norm, _dot_rows(template.steepest, centred), hessian)


def _dot_rows(rows: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """rows · vector (float64), one 1-D dot per row.

    Not `rows @ vector`: OpenBLAS spreads a matrix-vector product this long over every core, which
    breaks the one-core budget and stalls for milliseconds when the cores are busy; einsum avoids
    BLAS but is twice slower than the row dots.
    """
    return np.array([float(row @ vector) for row in rows])


def _hessian(template: _Template, weights: np.ndarray) -> np.ndarray:
    """Σ w G_c G_cᵀ (centred steepest-descent images) estimated on every other row and column.

    The Hessian only scales the Gauss-Newton step; the fixed point, Σ w G_c e = 0, still uses every
    pixel, so the estimate's accuracy does not depend on this sampling. One 1-D dot per entry of the
    upper triangle, for the reason given in `_dot_rows` (OpenBLAS threads the 8x8 gemm too).
    """
    sparse = weights.reshape(template.image.shape)[::2, ::2].ravel()
    count = max(float(sparse.sum()), 1.0)
    weighted = template.sparse * sparse
    gram = np.empty((len(weighted),) * 2)
    for i, j in zip(*np.triu_indices(len(weighted)), strict=True):
        gram[i, j] = gram[j, i] = float(weighted[i] @ template.sparse[j])
    mean = weighted.sum(axis=1, dtype=np.float64) / count
    return (gram - count * np.outer(mean, mean)) * (float(weights.sum()) / count)


def _step(template: _Template, fit: _Fit, aligned: np.ndarray) -> tuple[np.ndarray, float] | None:
    """(Gauss-Newton step, correlation) for the flattened warped frame `aligned` (spec §6.1, §6.2).

    ECC's objective in inverse compositional form: the residual is g ā − t̄ with the least-squares
    gain g = ⟨t̄, ā⟩ / ‖ā‖², whose zero is the maximum of the correlation coefficient, and the gain
    direction is projected out of the Hessian, Σ G_c (I − ā āᵀ/‖ā‖²) G_cᵀ (a rank-one update).
    None when the frame is flat on the counted pixels.
    """
    mean = float(fit.weights @ aligned) / fit.count
    centred = fit.weights * (aligned - mean)  # w ā
    energy = float(centred @ aligned)  # ‖ā‖²
    if energy < MIN_STD**2 * fit.count:
        return None
    covariance = float(fit.centred @ aligned)  # ⟨t̄, ā⟩
    frame_side = _dot_rows(template.steepest, centred)  # Σ w G_c ā
    hessian = fit.hessian - np.outer(frame_side, frame_side) / energy
    try:
        step = np.linalg.solve(hessian, covariance / energy * frame_side - fit.steepest_centred)
    except np.linalg.LinAlgError:
        return None
    return step, covariance / (math.sqrt(energy) * fit.norm)


def _gauss_newton(template: _Template, frame: np.ndarray, warp: np.ndarray, roi: np.ndarray,
                  iterations: int,
                  view: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray | None:
    """Refine `warp` (template pixels -> `frame` pixels, one pyramid level) on the pixels of `roi`.

    Inverse compositional Gauss-Newton (spec §6.1) on ECC's objective (§6.2): each iteration warps
    the (pre-blurred) frame once, solves with the template's steepest-descent images (`_step`) and
    composes the inverse increment; `view`, the frame already warped by `warp` and its `_valid`
    mask, saves the first warp. The counted pixels (`roi`, inside the frame by VALIDITY_SLACK px
    more than bilinear sampling needs) and with them the template side (`_fit`) are renewed only
    once the warp has moved that far. Stops when no corner moves by more than GN_TOLERANCE px, and
    keeps the previous warp when the correlation drops (an overshoot). None when the problem is
    degenerate: too few counted pixels, a flat image, a singular Hessian or a collapsing warp.
    """
    shape = template.image.shape
    centre = _centre(shape)
    counted = roi & template.interior
    fit, moved, best, previous = None, math.inf, -math.inf, warp
    for _ in range(iterations):
        if moved > VALIDITY_SLACK:
            inside = (_valid(frame.shape, warp, shape, 1 + VALIDITY_SLACK) if view is None
                      else _erode(view[1], VALIDITY_SLACK))
            fit, moved, best = _fit(template, counted & inside, fit), 0.0, -math.inf
            if fit is None:
                return None
        aligned = _warp(frame, warp, shape, cv2.INTER_LINEAR) if view is None else view[0]
        view = None  # only the first iteration starts at `warp`
        solved = _step(template, fit, aligned.ravel())
        if solved is None:
            return None
        step, correlation = solved
        if correlation < best - CORRELATION_SLACK:
            return previous
        linear = np.eye(3) + (step @ template.generators).reshape(3, 3)
        increment = template.to_pixels @ linear @ template.normalise
        if not _invertible(increment):
            return None
        previous, best = warp, correlation
        warp = _project(warp @ np.linalg.inv(increment), template.motion, centre)
        shift = _corner_shift(increment, np.eye(3), shape)
        if shift < GN_TOLERANCE:
            break
        moved += shift
    return warp


def _outliers(reference: np.ndarray, aligned: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Blobs whose normalised residual exceeds 3 robust sigmas (1.4826·MAD), dilated by 5 px.

    The sigma is floored at `MIN_OUTLIER_Z` (z units of the reference) because flat backgrounds make
    the MAD tiny; a 3x3 opening drops the thin residual lines that sub-pixel misfit leaves on edges,
    so that only defect-like blobs are masked. The median and MAD come from every MEDIAN_STRIDE-th
    pixel of the region: their standard error stays near 2 % of sigma (the threshold is often at its
    floor anyway), while a median over a whole 256x256 region costs about 0.6 ms on fresh data.
    """
    if region.sum() < 16:
        return np.zeros(region.shape, bool)
    residual = _standardised_difference(reference, aligned, region)
    values = residual[region][::MEDIAN_STRIDE]
    centre = float(np.median(values))
    sigma = 1.4826 * float(np.median(np.abs(values - centre)))
    threshold = max(OUTLIER_SIGMAS * sigma, MIN_OUTLIER_Z)
    outliers = ((np.abs(residual - centre) > threshold) & region).astype(np.uint8)
    outliers = cv2.morphologyEx(outliers, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * OUTLIER_DILATION + 1,) * 2)
    return cv2.dilate(outliers, kernel) > 0


def _standardised_difference(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> np.ndarray:
    """ẑ(a) − ẑ(b), each image standardised by its mean and deviation over `region` (float32).

    One masked pass per image for the statistics and one for the difference (three full passes
    per image with NumPy).
    """
    mask = region.view(np.uint8)
    mean_a, std_a = cv2.meanStdDev(a, mask=mask)
    mean_b, std_b = cv2.meanStdDev(b, mask=mask)
    scale_a, scale_b = 1 / (std_a.item() + 1e-6), 1 / (std_b.item() + 1e-6)
    return cv2.addWeighted(a, scale_a, b, -scale_b, mean_b.item() * scale_b - mean_a.item() * scale_a)


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Zero-mean normalised cross-correlation of two 1-D arrays, in their own precision (float32
    sums are good to ~1e-6 here, and a float64 copy of every operand would double the cost)."""
    a = a - a.mean()
    b = b - b.mean()
    denominator = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denominator if denominator > 0 else 0.0
