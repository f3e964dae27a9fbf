"""Batched resampling of frames onto the reference on torch (spec §6.3 step 6 and §6.4).

`glad.align.Aligner.align` ends by warping each frame with OpenCV (`cv2.warpPerspective`,
bilinear, the frame's edge continued beyond it) and deriving its validity mask from an all-ones
image warped with nearest interpolation and eroded by 1 px. `warp_batch` does the same for a
whole batch in one `torch.nn.functional.grid_sample` call, so that a GPU worker that already
holds the frames on the device can warp them there once the warps are known (estimation stays
on the CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name


def warp_batch(images: torch.Tensor, warps: torch.Tensor,
               out_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames resampled in the reference frame, and their validity masks.

    `images` are uint8 (B, H, W, 3) frames; `warps` (B, 3, 3) map reference pixel coordinates to
    frame pixel coordinates (`Alignment.warp`: frame(W x) ≈ reference(x), pixel centres at
    integers); `out_size` is the reference's (height, width). Returns the aligned frames, uint8
    (B, h, w, 3), bilinear with the frame's edge continued beyond it as the aligner's
    `cv2.warpPerspective` (within a grey level or two: OpenCV rounds coordinates to 1/32 px),
    and `valid`, bool (B, h, w): the pixel's nearest source pixel lies inside the frame, eroded
    by the 1 px support of bilinear interpolation (spec §6.4). Runs on the device of `images`.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (B, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    batch, height, width, _ = images.shape
    warps = torch.as_tensor(warps, dtype=torch.float32, device=images.device)
    if warps.shape != (batch, 3, 3) or min(height, width) < 2:
        raise ValueError(f"warps must be ({batch}, 3, 3) and frames at least 2x2 px, got "
                         f"{tuple(warps.shape)} for {width}x{height} frames")
    points, ahead = _source_points(warps, out_size)
    size = torch.tensor([width - 1, height - 1], dtype=torch.float32, device=images.device)
    grid = 2 * points / size - 1  # beyond the frame (or behind a homography's camera): its edge
    frames = images.permute(0, 3, 1, 2).float()
    sampled = F.grid_sample(frames, grid, mode="bilinear", padding_mode="border", align_corners=True)
    aligned = sampled.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    nearest = points.round()
    inside = ahead & (nearest >= 0).all(-1) & (nearest <= size).all(-1)
    return aligned, _erode(inside)


def _source_points(warps: torch.Tensor, out_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame pixel coordinates (x, y) of every reference pixel, (B, h, w, 2), and whether the
    homogeneous scale is positive there (a point behind the camera of a homography has no image)."""
    h, w = out_size
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=warps.device),
                                torch.arange(w, dtype=torch.float32, device=warps.device), indexing="ij")
    reference = torch.stack([cols, rows, torch.ones_like(cols)], dim=-1)  # (h, w, 3)
    mapped = torch.einsum("bij,hwj->bhwi", warps, reference)
    scale = mapped[..., 2:]
    ahead = scale[..., 0] > 0
    return mapped[..., :2] / torch.where(scale > 0, scale, torch.ones_like(scale)), ahead


def _erode(mask: torch.Tensor) -> torch.Tensor:
    """3x3 erosion of a (B, h, w) boolean mask; outside the image does not erode (as cv2.erode)."""
    return -F.max_pool2d(-mask[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0.5
