"""Registration on a reference image (glad.align): accuracy, robustness, gates and helpers."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from glad import align, synth
from glad.align import MOTIONS, Aligner, random_pose, select_reference, unwarp_heatmap
from glad.errors import ImageError

SIZE = 256
CORNERS = np.array([[0, 0, 1], [SIZE - 1, 0, 1], [0, SIZE - 1, 1], [SIZE - 1, SIZE - 1, 1]], float).T


def part(category: str, seed: int) -> np.ndarray:
    return synth.render_normal(category, np.random.default_rng(seed))


def move(image: np.ndarray, warp: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The frame that `warp` relates to `image` (frame(W x) = image(x)), with sensor noise."""
    frame = cv2.warpPerspective(image, warp, (SIZE, SIZE), borderMode=cv2.BORDER_REPLICATE)
    return np.clip(frame + rng.normal(0, 2, frame.shape), 0, 255).astype(np.uint8)


def corner_error(true: np.ndarray, estimate: np.ndarray) -> float:
    """Mean distance (px) between the frame positions of the reference corners under two warps."""
    a, b = true @ CORNERS, estimate @ CORNERS
    return float(np.linalg.norm(a[:2] / a[2] - b[:2] / b[2], axis=0).mean())


@pytest.mark.parametrize("motion", MOTIONS)
def test_recovers_known_transforms(motion: str) -> None:
    errors = []
    for seed, category in zip(range(3), ("pcb", "nut", "pcb"), strict=True):
        rng = np.random.default_rng(100 + seed)
        reference = part(category, seed)
        warp = align.random_warp(motion, rng)
        result = Aligner(reference, motion=motion).align(move(reference, warp, rng))
        assert result.ok, result.reason
        assert result.reason == ""
        assert result.warp.shape == (3, 3) and result.warp.dtype == np.float64
        assert result.correlation >= 0.8
        errors.append(corner_error(warp, result.warp))
    assert np.median(errors) < 1.0, errors


@pytest.mark.parametrize("category", ["nut", "pcb"])
def test_pasted_defect_does_not_bias_the_warp(category: str) -> None:
    errors = []
    for seed in range(3):
        rng = np.random.default_rng(200 + seed)
        reference = part(category, seed)
        defect = synth.defect_types(category)[seed % len(synth.defect_types(category))]
        damaged, mask = synth.add_defect(reference, category, defect, rng)
        assert mask.any()
        warp = align.random_warp("euclidean", rng)
        result = Aligner(reference, motion="euclidean").align(move(damaged, warp, rng))
        assert result.ok, result.reason
        errors.append(corner_error(warp, result.warp))
    assert max(errors) < 2.0, errors


def test_validity_mask_marks_pixels_outside_the_frame() -> None:
    reference = part("pcb", 1)
    shift = 40  # frame(x + 40) = reference(x): reference columns >= 216 have no source pixel
    warp = np.array([[1.0, 0.0, shift], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    frame = cv2.warpAffine(reference, warp[:2], (SIZE, SIZE), borderMode=cv2.BORDER_CONSTANT)
    result = Aligner(reference, motion="translation").align(frame)
    assert result.ok, result.reason
    assert result.valid is not None and result.aligned is not None
    assert result.valid.shape == reference.shape[:2] and result.valid.dtype == bool
    assert result.aligned.shape == reference.shape and result.aligned.dtype == np.uint8
    edge = SIZE - shift
    assert not result.valid[:, edge - 1:].any()  # outside, plus the 1 px erosion
    assert result.valid[1:-1, 1:edge - 2].all()
    assert any("valid ROI fraction" in w for w in result.warnings)
    inside = result.valid
    assert np.abs(result.aligned[inside].astype(int) - reference[inside]).mean() < 3


@pytest.mark.parametrize(
    "frame, words",
    [
        (np.full((SIZE, SIZE, 3), 90, np.uint8), "blank"),
        (part("weave", 3), "alignment_failed"),
        (np.random.default_rng(4).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), "alignment_failed"),
        (np.rot90(part("pcb", 0)).copy(), "rotation"),
        (part("pcb", 0)[:20, :20].copy(), "too small"),
        (cv2.resize(part("pcb", 0), (2000, 2000), interpolation=cv2.INTER_LINEAR), "scale"),
        (np.zeros((SIZE, SIZE, 3), np.float32), "unsupported"),
    ],
    ids=["blank", "other_product", "noise", "rotated_90", "tiny", "huge", "float"],
)
def test_gates_reject_bad_frames(frame: np.ndarray, words: str) -> None:
    result = Aligner(part("pcb", 0)).align(frame)
    assert not result.ok
    assert result.reason.startswith("alignment_failed: ")
    assert words in result.reason


def test_heavy_blur_does_not_raise() -> None:
    reference = part("nut", 2)
    result = Aligner(reference).align(cv2.GaussianBlur(reference, (0, 0), 8))
    assert result.ok == (result.reason == "")
    assert np.all(np.isfinite(result.warp))


@pytest.mark.parametrize("image", [np.full((SIZE, SIZE, 3), 128, np.uint8), np.zeros((16, 16, 3), np.uint8)])
def test_unusable_reference_raises(image: np.ndarray) -> None:
    with pytest.raises(ImageError):
        Aligner(image)


def test_random_pose_moves_image_and_mask_identically() -> None:
    mask = np.zeros((SIZE, SIZE), bool)
    mask[60:150, 90:200] = True
    image = np.where(mask[..., None], 220, 30).astype(np.uint8).repeat(3, axis=2)
    moved, moved_mask = random_pose(image, mask, np.random.default_rng(7))
    assert moved_mask is not None and moved_mask.dtype == bool and moved.shape == image.shape
    assert (moved_mask != mask).mean() > 0.01  # it did move
    agreement = ((moved[..., 0] > 125) == moved_mask).mean()
    assert agreement > 0.995
    assert moved.min() == 30  # border replication, no black corners
    again, _ = random_pose(image, None, np.random.default_rng(7))
    assert np.array_equal(again, moved)


def test_unwarp_heatmap_puts_a_blob_back_in_the_frame() -> None:
    reference = part("pcb", 5)
    rng = np.random.default_rng(5)
    warp = align.random_warp("euclidean", rng)
    frame = move(reference, warp, rng)
    result = Aligner(reference).align(frame)
    assert result.ok, result.reason
    heat = np.zeros((64, 64), np.float32)
    heat[40, 20] = 1.0  # reference pixel (20.5 * 4 - 0.5, 40.5 * 4 - 0.5) = (81.5, 161.5)
    heat = cv2.GaussianBlur(heat, (0, 0), 1.5)
    back = unwarp_heatmap(heat, result, frame.shape[:2])
    assert back.shape == frame.shape[:2]
    peak = np.unravel_index(np.argmax(back), back.shape)[::-1]
    expected = (warp @ [81.5, 161.5, 1.0])[:2]
    assert np.linalg.norm(np.array(peak) - expected) < 3.0
    outside = unwarp_heatmap(heat, result, (400, 400), fill=-1.0)
    assert outside[399, 399] == -1.0


def test_select_reference_prefers_a_typical_image() -> None:
    images = [part("nut", seed) for seed in range(4)]
    images.insert(1, np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    assert select_reference(images) != 1
    twin = part("pcb", 0)
    assert select_reference([part("pcb", 1), twin, twin, twin]) in (1, 2, 3)


def test_alignment_does_not_depend_on_earlier_frames() -> None:
    """The aligner keeps no state between frames: OpenCV calls that write into their inputs
    (phaseCorrelate windows them) or draw from OpenCV's global RNG (RANSAC) must not leak."""
    reference = synth.render_normal("nut", np.random.default_rng(1))
    frame = synth.add_defect(synth.render_normal("nut", np.random.default_rng(5)), "nut", "hole",
                       np.random.default_rng(1))[0]
    aligner = Aligner(reference)
    first = aligner.align(frame).warp
    for seed in range(10, 14):
        aligner.align(synth.render_normal("nut", np.random.default_rng(seed)))
    np.testing.assert_array_equal(aligner.align(frame).warp, first)


def test_object_mask_covers_the_part_and_not_the_background() -> None:
    part = synth.render_normal("nut", np.random.default_rng(0))
    mask = align.object_mask(part)
    assert mask.shape == part.shape[:2] and mask.dtype == bool
    assert mask[128, 128] and not mask[0, 0] and not mask[-1, -1]
    assert 0.1 < mask.mean() < 0.9


def test_object_mask_of_a_texture_is_the_whole_image() -> None:
    assert align.object_mask(synth.render_normal("weave", np.random.default_rng(0))).all()


def test_partial_occlusion_gives_a_clear_outcome() -> None:
    """A third of the part hidden by an occluder: aligned close to the truth, or rejected with a
    reason; never an exception."""
    rng = np.random.default_rng(7)
    reference = synth.render_normal("pcb", np.random.default_rng(3))
    warp = align.random_warp("euclidean", rng)
    frame = move(reference, warp, rng)
    frame[:, :85] = 20  # occluder over the left third
    result = Aligner(reference).align(frame)
    if result.ok:
        assert corner_error(result.warp, warp) < 2.0
    else:
        assert result.reason.startswith("alignment_failed")


# ---------------------------------------------------------------------------------------------
# The Gauss-Newton refinement (spec §6.1 with ECC's objective) and its reference-side cache
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("motion", MOTIONS)
def test_reused_aligner_matches_a_fresh_one(motion: str) -> None:
    """The reference pyramid, gradients and steepest-descent images computed in __init__ serve
    every frame: after other frames, an aligner gives exactly what a fresh one gives."""
    reference = part("pcb", 2)
    rng = np.random.default_rng(11)
    frames = [move(reference, align.random_warp(motion, rng), rng) for _ in range(3)]
    reused = Aligner(reference, motion=motion)
    for frame in frames[1:]:
        reused.align(frame)
    again, fresh = reused.align(frames[0]), Aligner(reference, motion=motion).align(frames[0])
    np.testing.assert_array_equal(again.warp, fresh.warp)
    np.testing.assert_array_equal(again.aligned, fresh.aligned)
    assert again.correlation == fresh.correlation


def test_finest_level_exits_early_on_an_easy_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    """A frame already close to the reference: the finest level stops after its first step (no
    corner moves by GN_TOLERANCE) and the warp is still accurate."""
    reference = part("nut", 4)
    rng = np.random.default_rng(4)
    warp = np.array([[1.0, 0.0, 0.3], [0.0, 1.0, -0.2], [0.0, 0.0, 1.0]])
    frame = move(reference, warp, rng)
    steps: list[int] = []
    step = align._step

    def counting(template: align._Template, fit: align._Fit,
                 aligned: np.ndarray) -> tuple[np.ndarray, float] | None:
        steps.append(template.image.shape[0])
        return step(template, fit, aligned)

    monkeypatch.setattr(align, "_step", counting)
    result = Aligner(reference, motion="euclidean").align(frame)
    assert result.ok, result.reason
    assert corner_error(warp, result.warp) < 0.05
    assert steps.count(SIZE) == 1, steps


@pytest.mark.parametrize("motion", ["euclidean", "homography"])
def test_gain_and_offset_do_not_move_the_warp(motion: str) -> None:
    """The refinement maximises the correlation coefficient, as ECC does: a brighter, lower-contrast
    frame aligns where the original does."""
    reference = part("pcb", 6)
    rng = np.random.default_rng(6)
    frame = move(reference, align.random_warp(motion, rng), rng)
    dimmed = np.clip(0.7 * frame.astype(float) + 40, 0, 255).astype(np.uint8)
    aligner = Aligner(reference, motion=motion)
    plain, changed = aligner.align(frame), aligner.align(dimmed)
    assert plain.ok and changed.ok, (plain.reason, changed.reason)
    assert corner_error(plain.warp, changed.warp) < 0.05
    assert abs(plain.correlation - changed.correlation) < 0.01


@pytest.mark.parametrize("motion", MOTIONS)
def test_gauss_newton_recovers_a_small_warp_at_one_level(motion: str) -> None:
    """One pyramid level on its own: a known sub-pixel-to-pixel warp of the blurred reference is
    recovered from the identity, and a flat frame is refused rather than answered."""
    reference = cv2.cvtColor(part("pcb", 7), cv2.COLOR_RGB2GRAY).astype(np.float32)
    template = align._template(reference, motion)
    pose = align.random_warp(motion, np.random.default_rng(8))
    warp = np.eye(3) + 0.1 * (pose - np.eye(3))  # a tenth of a bench pose, still about the centre
    frame = cv2.warpPerspective(reference, warp, (SIZE, SIZE), borderMode=cv2.BORDER_REPLICATE)
    roi = np.ones((SIZE, SIZE), bool)
    estimate = align._gauss_newton(template, align._smooth(frame), np.eye(3), roi, 30)
    assert estimate is not None
    assert corner_error(warp, estimate) < 0.05
    flat = np.full((SIZE, SIZE), 90, np.float32)
    assert align._gauss_newton(template, flat, np.eye(3), roi, 30) is None


def test_standardised_difference_matches_the_numpy_definition() -> None:
    rng = np.random.default_rng(9)
    a = (rng.random((64, 80)) * 200).astype(np.float32)
    b = (0.6 * a + 30 + rng.normal(0, 3, a.shape)).astype(np.float32)
    region = rng.random(a.shape) > 0.4

    def z(image: np.ndarray) -> np.ndarray:
        return (image - image[region].mean()) / (image[region].std() + 1e-6)

    np.testing.assert_allclose(align._standardised_difference(a, b, region), z(a) - z(b), atol=1e-5)


def test_row_dots_and_subsampled_hessian_match_the_dense_products() -> None:
    """The BLAS-thread-free products equal their matrix forms; the Hessian is the centred Gram of
    the steepest-descent images on every other row and column, scaled to the counted pixels."""
    reference = cv2.cvtColor(part("nut", 3), cv2.COLOR_RGB2GRAY).astype(np.float32)
    template = align._template(reference, "homography")
    weights = (np.random.default_rng(3).random(SIZE * SIZE) > 0.3).astype(np.float32)
    np.testing.assert_allclose(align._dot_rows(template.steepest, weights),
                               template.steepest.astype(np.float64) @ weights, rtol=1e-4)
    sparse = weights.reshape(SIZE, SIZE)[::2, ::2].ravel().astype(np.float64)
    rows = template.sparse.astype(np.float64)
    mean = rows @ sparse / sparse.sum()
    centred = (rows - mean[:, None]) * sparse
    expected = centred @ rows.T * (weights.sum() / sparse.sum())
    np.testing.assert_allclose(align._hessian(template, weights), expected, rtol=1e-3,
                               atol=1e-6 * np.abs(expected).max())


def test_untrusted_start_refines_from_the_coarsest_level(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without enough RANSAC inliers the pyramid starts from a phase-correlation shift at its
    coarsest level (a trusted feature warp starts one level finer): a ±8° pose is still recovered."""
    levels: list[int] = []
    refine = Aligner._refine

    def phase_only(self: align._CoarseEstimator, work: np.ndarray) -> tuple[np.ndarray, bool]:
        return self._project(self._phase_shift(work)), False

    def recording(self: Aligner, work: align._WorkFrame, level: int, *args: object) -> np.ndarray | None:
        levels.append(level)
        return refine(self, work, level, *args)

    monkeypatch.setattr(align._CoarseEstimator, "estimate", phase_only)
    monkeypatch.setattr(Aligner, "_refine", recording)
    reference = part("pcb", 1)
    rng = np.random.default_rng(21)
    warp = align.random_warp("euclidean", rng)
    result = Aligner(reference, motion="euclidean").align(move(reference, warp, rng))
    assert result.ok, result.reason
    assert levels[0] == 2
    assert corner_error(warp, result.warp) < 0.05


# ---------------------------------------------------------------------------------------------
# glad.warp: the batched torch resampling against OpenCV's
# ---------------------------------------------------------------------------------------------


def assert_same_resampling(aligned: np.ndarray, valid: np.ndarray, expected_aligned: np.ndarray,
                           expected_valid: np.ndarray) -> None:
    """Validity equal but on the 1 px band along the mask's edge; grey levels within 2 where both
    are valid (OpenCV rounds coordinates to 1/32 px)."""
    ones = np.ones((3, 3), np.uint8)
    mask = expected_valid.astype(np.uint8)
    band = cv2.dilate(mask, ones) != cv2.erode(mask, ones)
    assert not ((valid != expected_valid) & ~band).any()
    both = valid & expected_valid
    assert both.mean() > 0.3
    assert np.abs(aligned.astype(int) - expected_aligned.astype(int))[both].max() <= 2


def test_warp_batch_reproduces_the_aligners_resampling() -> None:
    torch = pytest.importorskip("torch")
    from glad.warp import warp_batch

    reference = part("pcb", 8)
    aligner = Aligner(reference, motion="similarity")
    rng = np.random.default_rng(31)
    frames = [move(reference, align.random_warp("similarity", rng), rng) for _ in range(3)]
    results = [aligner.align(frame) for frame in frames]
    assert all(result.ok for result in results)
    aligned, valid = warp_batch(torch.from_numpy(np.stack(frames)),
                                torch.from_numpy(np.stack([r.warp for r in results])), reference.shape[:2])
    assert aligned.dtype == torch.uint8 and valid.dtype == torch.bool
    assert tuple(aligned.shape) == (3, SIZE, SIZE, 3) and tuple(valid.shape) == (3, SIZE, SIZE)
    for index, result in enumerate(results):
        assert_same_resampling(aligned[index].numpy(), valid[index].numpy(), result.aligned, result.valid)


def test_warp_batch_matches_opencv_on_rectangular_frames_and_homographies() -> None:
    """Frames of another size than the reference, shifted far enough to leave invalid regions."""
    torch = pytest.importorskip("torch")
    from glad.warp import warp_batch

    rng = np.random.default_rng(32)
    frames = np.stack([cv2.resize(part(category, seed), (320, 180), interpolation=cv2.INTER_AREA)
                       for category, seed in (("nut", 1), ("pcb", 2), ("nut", 3), ("pcb", 4))])
    warps = []
    for shift in ((0, 0), (60, -30), (-45, 20), (10, 70)):
        warp = align.random_warp("homography", rng)
        warp[:2, 2] += shift
        warps.append(np.diag([320 / SIZE, 180 / SIZE, 1.0]) @ warp)
    aligned, valid = warp_batch(torch.from_numpy(frames), torch.from_numpy(np.stack(warps)), (SIZE, SIZE))
    for frame, warp, out, inside in zip(frames, warps, aligned.numpy(), valid.numpy(), strict=True):
        expected = align._warp(frame, warp, (SIZE, SIZE), cv2.INTER_LINEAR, cv2.BORDER_REPLICATE)
        assert_same_resampling(out, inside, expected, align._valid(frame.shape, warp, (SIZE, SIZE)))
    assert not valid.all(dim=(1, 2)).any()  # every shifted frame leaves part of the reference uncovered


@pytest.mark.parametrize("shift", [(-0.4, 0.0), (0.0, -0.3), (0.45, 0.2), (-0.2, 0.49)])
def test_no_valid_pixel_blends_in_the_zero_border(shift: tuple[float, float]) -> None:
    """A frame off by less than a pixel keeps its border pixels valid (the erosion sees nothing
    beyond the reference's border); they show the frame, not the zero border blended in, with
    the aligner and with `warp_batch` (they used to show a dark line, which the model flagged)."""
    torch = pytest.importorskip("torch")
    from glad.warp import warp_batch

    frame = np.full((SIZE, SIZE, 3), 200, np.uint8)
    warp = np.array([[1.0, 0.0, shift[0]], [0.0, 1.0, shift[1]], [0.0, 0.0, 1.0]])
    aligned, valid = Aligner(part("nut", 1))._warp_frame(frame, warp, [])
    batch_aligned, batch_valid = warp_batch(torch.from_numpy(frame[None]),
                                            torch.from_numpy(warp[None]), (SIZE, SIZE))
    for out, inside in ((aligned, valid), (batch_aligned[0].numpy(), batch_valid[0].numpy())):
        assert inside.mean() > 0.98
        assert out[inside].min() >= 199


def test_warp_batch_rejects_wrong_inputs() -> None:
    torch = pytest.importorskip("torch")
    from glad.warp import warp_batch

    with pytest.raises(ValueError, match="uint8"):
        warp_batch(torch.zeros((1, 8, 8, 3)), torch.eye(3)[None], (8, 8))
    with pytest.raises(ValueError, match="warps"):
        warp_batch(torch.zeros((2, 8, 8, 3), dtype=torch.uint8), torch.eye(3)[None], (8, 8))
