"""Deterministic synthetic industrial-inspection data in MVTec AD layout.

The project's test and benchmark data: two rendered parts ("nut", "pcb") and a texture ("weave"),
with the nuisance variation of a real line (pose jitter, lighting, sensor noise) and small,
localized defects whose ground-truth masks mark exactly the pixels the defect changed. Each image
has its own random generator, seeded from (seed, category, folder, index), so a dataset is
byte-for-byte reproducible and independent of the order in which it is written.

For the online model updater there are also product `VARIANTS` (a normal change of look, as when a
new supplier's parts arrive: `render_normal(..., variant=)`) and `paste_defect`, generic canary
defects for any RGB image, to check that a candidate model still catches defects on real frames.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from tqdm import tqdm

CATEGORIES: dict[str, str] = {"nut": "object", "pcb": "object", "weave": "texture"}


@dataclass(frozen=True)
class SynthConfig:
    """Image side and image counts of one dataset (`n_test_defect` is per defect type)."""

    size: int = 256
    n_train: int = 60
    n_test_good: int = 15
    n_test_defect: int = 5


PRESETS: dict[str, SynthConfig] = {
    "tiny": SynthConfig(n_train=16, n_test_good=4, n_test_defect=2),
    "small": SynthConfig(),
    "full": SynthConfig(n_train=200, n_test_good=40, n_test_defect=12),
}

MIN_SIZE = 64
CHANGE_THRESHOLD = 16  # grey levels: a pixel is in the mask when a channel changed this much
MASK_FRACTION = (0.003, 0.05)  # share of the image a defect mask covers
MAX_DEFECT_TRIES = 50
LIGHT_ANGLE = -0.75 * math.pi  # light from the upper left (image y points down)

Rng = np.random.Generator
Image = np.ndarray  # float32 (H, W, 3) RGB grey levels, while drawing
Colour = tuple[float, float, float]
Restyle = Callable[[Image], Image]  # a variant's change to a part's layer, before it is posed

VARIANTS: dict[str, str] = {  # name: what it is for
    "recoloured": "the part in another colour, shading and texture kept (brass nut, blue solder mask, "
    "red and beige cloth): a large, consistent shift that a model of the old parts flags everywhere",
    "relabelled": "a new marking printed at a fixed place on the part, moving with it (a stamped grade "
    "on the nut, a maker's logo on the board): a small, consistent change; objects only",
}


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def defect_types(category: str) -> tuple[str, ...]:
    """Defect types of a category, in a fixed order; they name the test and mask folders."""
    _check_category(category)
    return tuple(_DEFECTS[category])


def variants(category: str) -> tuple[str, ...]:
    """Product variants (see `VARIANTS`) that a category can be rendered in, in a fixed order."""
    _check_category(category)
    return tuple(_RESTYLES[category])


def render_normal(
    category: str, rng: Rng, size: int = 256, variant: str | None = None
) -> np.ndarray:
    """A defect-free image of `category`, varied by `rng`: RGB uint8 (size, size, 3).

    `variant` (one of `variants(category)`) changes the part's look before it is posed; it uses no
    random numbers, so the same `rng` state gives the same part, pose, light and noise in every
    variant, and without a variant the images are those of earlier versions, byte for byte.
    """
    _check_category(category)
    if size < MIN_SIZE:
        raise ValueError(f"size {size} is too small: at least {MIN_SIZE} px")
    return _finish(_RENDERERS[category](rng, size, _restyle(category, variant)), rng)


def add_defect(
    image: np.ndarray, category: str, defect: str, rng: Rng
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one `defect` on a normal `image`; return the new RGB uint8 image and a bool mask.

    The mask marks the pixels that changed by at least `CHANGE_THRESHOLD` grey levels in some
    channel; a shape is redrawn until its mask covers a share of the image in `MASK_FRACTION`.
    """
    if defect not in defect_types(category):
        raise ValueError(f"unknown defect {defect!r} for {category!r}: {defect_types(category)}")
    region = _defect_region(image, category)
    if not region.any():
        raise ValueError(f"the image shows no {category!r} to put a defect on")
    draw = _DEFECTS[category][defect]
    return _draw_sized(image, region, rng, draw, f"a {defect!r} of plausible size on this {category!r}")


def paste_defect(
    image: np.ndarray, region: np.ndarray | None, rng: Rng
) -> tuple[np.ndarray, np.ndarray]:
    """Paste a generic synthetic defect on any RGB uint8 `image`; return the new image and a bool mask.

    Canary defects (DRAEM / CutPaste style) for real normal frames of any product, to check that a
    candidate model still catches defects. Each try picks one of: a patch cut from elsewhere in the
    image, turned, maybe mirrored and recoloured, pasted with a soft edge; a thin curved scratch that
    contrasts with the surface; a semi-transparent stain. It lies inside `region` (bool, the image's
    height and width; None: all but a margin). As in `add_defect`, the mask marks the pixels that
    changed by at least `CHANGE_THRESHOLD` and covers a share of the image in `MASK_FRACTION`; pixels
    that changed less are restored, so the image outside the mask is bit-identical to `image`.
    """
    _check_rgb(image)
    region = _inner(image.shape[:2]) if region is None else _checked_region(region, image)
    result, mask = _draw_sized(image, region, rng, _canary, "a canary defect of plausible size")
    return np.where(mask[:, :, None], result, image), mask


def generate_dataset(
    out: str | Path,
    categories: Sequence[str] | None = None,
    config: SynthConfig = PRESETS["small"],
    seed: int = 0,
    progress: bool = False,
) -> list[Path]:
    """Write the categories under `out` in MVTec AD layout; return their folders.

    Files of the same name are overwritten, other files are left alone.
    """
    if isinstance(categories, str):
        categories = [categories]
    names = list(CATEGORIES) if categories is None else list(categories)
    for name in names:
        _check_category(name)
    roots = [Path(out) / name for name in names]
    jobs = [(root, *job) for root in roots for job in _jobs(root.name, config)]
    for root, folder, defect, index in tqdm(jobs, desc="synth", unit="img", disable=not progress):
        rng = _image_rng(seed, root.name, folder, index)
        _write_sample(root, folder, defect, index, rng, config.size)
    return roots


# --------------------------------------------------------------------------------------------
# Dataset writing
# --------------------------------------------------------------------------------------------


def _check_category(category: str) -> None:
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}: expected one of {sorted(CATEGORIES)}")


def _check_rgb(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")


def _checked_region(region: np.ndarray, image: np.ndarray) -> np.ndarray:
    """`region` as a bool mask, checked against the image: same height and width, not empty."""
    region = np.asarray(region, bool)
    if region.shape != image.shape[:2]:
        raise ValueError(f"region shape {region.shape} does not match the image's {image.shape[:2]}")
    if not region.any():
        raise ValueError("the region is empty: it allows no pixel to put a defect on")
    return region


def _jobs(category: str, config: SynthConfig) -> Iterator[tuple[str, str | None, int]]:
    """(folder, defect or None, index) of every image of one category."""
    for index in range(config.n_train):
        yield "train/good", None, index
    for index in range(config.n_test_good):
        yield "test/good", None, index
    for defect in defect_types(category):
        for index in range(config.n_test_defect):
            yield f"test/{defect}", defect, index


def _image_rng(seed: int, category: str, folder: str, index: int) -> Rng:
    """The generator of one image, independent of every other image and of the write order."""
    key = [seed, zlib.crc32(category.encode()), zlib.crc32(folder.encode()), index]
    return np.random.default_rng(np.random.SeedSequence(key))


def _write_sample(
    root: Path, folder: str, defect: str | None, index: int, rng: Rng, size: int
) -> None:
    image = render_normal(root.name, rng, size)
    if defect is not None:
        image, mask = add_defect(image, root.name, defect, rng)
        _write_png(root / "ground_truth" / defect / f"{index:03d}_mask.png", mask * np.uint8(255))
    _write_png(root / folder / f"{index:03d}.png", image[:, :, ::-1])


def _write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(pixels)):
        raise OSError(f"{path}: could not write the image")


# --------------------------------------------------------------------------------------------
# Shared imaging helpers
# --------------------------------------------------------------------------------------------


def _finish(image: Image, rng: Rng) -> np.ndarray:
    """Camera effects on a rendered scene: lens blur, lighting gain and gradient, sensor noise."""
    size = image.shape[0]
    image = cv2.GaussianBlur(image, (0, 0), 0.6)
    direction = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    gradient = math.cos(direction) * ramp[None, :] + math.sin(direction) * ramp[:, None]
    light = rng.uniform(0.92, 1.08) * (1 + rng.uniform(0.0, 0.08) * gradient)
    image *= light[:, :, None]
    image += _noise(rng, image.shape, rng.uniform(2.0, 3.0))
    return _to_uint8(image)


def _draw_sized(
    image: np.ndarray,
    region: np.ndarray,
    rng: Rng,
    draw: Callable[[Image, np.ndarray, Rng], Image],
    what: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Redraw until the changed pixels cover a share of the image in `MASK_FRACTION`: (image, mask)."""
    source = image.astype(np.float32)
    for _ in range(MAX_DEFECT_TRIES):
        result = _to_uint8(draw(source, region, rng))
        mask = _changed(image, result)
        if MASK_FRACTION[0] <= mask.mean() <= MASK_FRACTION[1]:
            return result, mask
    raise RuntimeError(f"could not draw {what}")


def _to_uint8(image: Image) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _noise(rng: Rng, shape: tuple[int, ...], sigma: float = 2.5) -> np.ndarray:
    """Gaussian noise, float32."""
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)


def _mottle(rng: Rng, size: int, cells: int) -> np.ndarray:
    """Smooth random field of roughly unit variance, with about `cells` blobs across the image."""
    coarse = rng.standard_normal((cells, cells), dtype=np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def _step(value: np.ndarray, edge: float) -> np.ndarray:
    """0 below `edge`, 1 above, with a one-pixel anti-aliased ramp."""
    return np.clip(value - edge + 0.5, 0.0, 1.0)


def _plain(size: int, colour: Colour, rng: Rng, shade: float) -> Image:
    """A uniform background whose brightness varies by up to `shade` grey levels per image."""
    tone = np.asarray(colour, np.float32) + rng.uniform(-shade, shade)
    return np.broadcast_to(tone, (size, size, 3)).copy()


def _place(background: Image, layer: Image, alpha: np.ndarray, rng: Rng) -> Image:
    """Composite a centred part on the background, with pose jitter and a soft drop shadow."""
    size = background.shape[0]
    scale = size / 256
    centre = ((size - 1) / 2, (size - 1) / 2)
    pose = cv2.getRotationMatrix2D(centre, rng.uniform(-4, 4), 1.0)
    pose[:, 2] += rng.uniform(-4, 4, 2) * scale
    layer = cv2.warpAffine(layer, pose, (size, size), flags=cv2.INTER_LINEAR)
    alpha = cv2.warpAffine(alpha, pose, (size, size), flags=cv2.INTER_LINEAR)
    offset = round(3 * scale)
    shadow = cv2.GaussianBlur(np.roll(alpha, (offset, offset), axis=(0, 1)), (0, 0), 5 * scale)
    return _blend(background * (1 - 0.35 * shadow[:, :, None]), layer, alpha)


def _blend(image: Image, target: Image | Sequence[float], alpha: np.ndarray) -> Image:
    """`image` where alpha is 0, `target` where it is 1; untouched pixels stay bit-identical."""
    target = np.asarray(target, np.float32)
    return image + alpha[:, :, None] * (target - image)


def _changed(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Pixels where some channel moved by at least `CHANGE_THRESHOLD` grey levels."""
    delta = np.abs(after.astype(np.int16) - before.astype(np.int16)).max(axis=2)
    return delta >= CHANGE_THRESHOLD


def _fixed(points: Sequence | np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Points as OpenCV fixed-point int32 coordinates (shift=4), for sub-pixel drawing."""
    return np.rint(np.asarray(points, np.float64) * scale * 16).astype(np.int32)


def _fill(shape: tuple[int, int], polygon: np.ndarray, blur: float = 0.0) -> np.ndarray:
    """Coverage (float32, 0..1) of a filled polygon, optionally softened by a Gaussian blur."""
    alpha = np.zeros(shape, np.float32)
    cv2.fillPoly(alpha, [_fixed(polygon)], 1.0, cv2.LINE_AA, 4)
    return cv2.GaussianBlur(alpha, (0, 0), blur) if blur > 0 else alpha


def _stroke(shape: tuple[int, int], paths: Sequence[np.ndarray], thickness: int) -> np.ndarray:
    """Coverage (float32, 0..1) of open polylines `thickness` pixels wide."""
    alpha = np.zeros(shape, np.float32)
    cv2.polylines(alpha, [_fixed(p) for p in paths], False, 1.0, thickness, cv2.LINE_AA, 4)
    return alpha


def _kernel(pixels: float) -> np.ndarray:
    """Square morphology kernel reaching `pixels` from its centre."""
    side = 2 * max(1, round(pixels)) + 1
    return np.ones((side, side), np.uint8)


# --------------------------------------------------------------------------------------------
# Nut: hex nut seen from above (threaded bore, countersink, flat face, chamfered corners)
# --------------------------------------------------------------------------------------------

NUT_BACKGROUND = (44, 46, 50)
NUT_TINT = (1.0, 0.985, 0.95)  # slightly warm steel
NUT_APOTHEM = 0.30  # hexagon centre-to-flat distance, in image sides
NUT_RADII = {"thread": 0.085, "countersink": 0.125, "face": 0.155, "chamfer": 0.275}  # starts
NUT_THREAD_PITCH = 4.5  # px at 256
NUT_MARKS = (90.0, 210.0, 330.0)  # degrees: three stamped grade marks on the face


def _render_nut(rng: Rng, size: int, restyle: Restyle) -> Image:
    """A nut with its own thread phase, surface mottling, brightness and pose."""
    shape = _nut_shape(size)
    phase = rng.uniform(0, 2 * math.pi)  # where the thread starts differs from nut to nut
    helix = shape["helix_cos"] * math.cos(phase) - shape["helix_sin"] * math.sin(phase)
    tone = shape["tone"] + 32 * helix * shape["thread"]
    tone += 6 * _mottle(rng, size, 12) * shape["face"]
    tone *= rng.uniform(0.96, 1.04)
    layer = restyle(tone[:, :, None] * np.asarray(NUT_TINT, np.float32))
    return _place(_plain(size, NUT_BACKGROUND, rng, 6), layer, shape["alpha"], rng)


@lru_cache(maxsize=4)
def _nut_shape(size: int) -> dict[str, np.ndarray]:
    """What every nut of this size shares: shading, surface weights, thread helix, coverage."""
    scale = size / 256
    x, y = np.meshgrid(*(np.arange(size, dtype=np.float32) - (size - 1) / 2,) * 2)
    radius = np.hypot(x, y)
    angle = np.arctan2(y, x)
    lit = np.cos(angle - LIGHT_ANGLE)  # +1 where a surface sloping outwards faces the light
    sheen = 8 * np.cos(2 * (angle - LIGHT_ANGLE))
    surfaces = {  # inside out; each starts at its radius in NUT_RADII and covers the one before
        "thread": 78 - 25 * lit,
        "countersink": 128 - 45 * lit,
        "face": 172 + 3 * np.sin(2 * math.pi * radius / (2.3 * scale)) + sheen,  # lathe marks
        "chamfer": 138 + 50 * lit,
    }
    weights, outside = {}, np.zeros_like(radius)
    for name in reversed(surfaces):
        start = _step(radius, NUT_RADII[name] * size) if name != "thread" else 1.0
        weights[name] = (1 - outside) * start
        outside = outside + weights[name]
    tone = sum(weights[name] * surfaces[name] for name in surfaces)
    tone -= 30 * np.exp(-(((radius - NUT_RADII["chamfer"] * size) / scale) ** 2))  # crisp edge
    tone -= 60 * _grade_marks(size)
    hexagon = np.maximum.reduce(
        [np.abs(x), np.abs(0.5 * x + 0.866 * y), np.abs(0.5 * x - 0.866 * y)]
    )
    helix = 2 * math.pi * radius / (NUT_THREAD_PITCH * scale) + angle
    shape = {
        "tone": tone,
        "thread": weights["thread"],
        "face": weights["face"],
        "helix_cos": np.cos(helix),
        "helix_sin": np.sin(helix),
        "alpha": _step(NUT_APOTHEM * size, hexagon) * _step(radius, NUT_RADII["thread"] * size),
    }
    for array in shape.values():
        array.flags.writeable = False  # cached and shared by every nut of this size
    return shape


def _grade_marks(size: int) -> np.ndarray:
    """Three short radial grooves stamped on the flat face, as on graded nuts."""
    centre = np.full(2, (size - 1) / 2)
    paths = []
    for degrees in NUT_MARKS:
        direction = np.array([math.cos(math.radians(degrees)), math.sin(math.radians(degrees))])
        paths.append(centre + np.outer([0.19 * size, 0.24 * size], direction))
    return _stroke((size, size), paths, max(1, round(2 * size / 256)))


# --------------------------------------------------------------------------------------------
# PCB: green board with traces, pads, chips, passives, holes and silkscreen, on a grey table
# --------------------------------------------------------------------------------------------
# Layout coordinates are pixels of a 256 px image, scaled to the size asked for.


class _Chip(NamedTuple):
    centre: tuple[float, float]
    half: tuple[float, float]  # body half-size
    pins: int  # per side
    sides: str  # sides with pins: l, r, t, b
    label: str
    marking: str


class _Passive(NamedTuple):
    centre: tuple[float, float]
    vertical: bool
    kind: str  # "resistor" or "capacitor"
    label: str


PCB_BACKGROUND = (150, 150, 146)
PCB_COLOURS = {
    "board": (28, 104, 52),
    "trace": (46, 138, 66),
    "tin": (196, 196, 186),
    "silk": (232, 232, 222),
    "chip": (34, 34, 38),
    "print": (118, 118, 116),
    "resistor": (30, 30, 30),
    "capacitor": (186, 146, 92),
    "can_rim": (120, 120, 126),
    "can": (205, 205, 210),
    "glint": (245, 245, 248),
}
PCB_BOARD = ((128, 128), (102, 94))  # centre, half-size
PCB_MOUNTS = ((38, 46), (218, 46), (38, 210), (218, 210))
PCB_CHIPS = (
    _Chip((86, 100), (18, 18), 8, "lrtb", "U1", "MCU"),
    _Chip((166, 160), (22, 9), 7, "tb", "U2", "OPA"),
)
PCB_PASSIVES = (
    _Passive((152, 64), False, "resistor", "R1"),
    _Passive((152, 84), False, "resistor", "R2"),
    _Passive((152, 104), False, "capacitor", "C1"),
    _Passive((56, 150), True, "capacitor", "C2"),
    _Passive((72, 150), True, "resistor", "R3"),
    _Passive((196, 196), False, "capacitor", "C3"),
)
PCB_HEADER = ((64, 200), 12, 8)  # first pin, pitch, pin count
PCB_CAN = ((202, 110), (6, 15))  # crystal: centre, half-size
PCB_VIAS = (
    (126, 128), (134, 138), (120, 60), (186, 128), (104, 176),
    (200, 150), (190, 60), (44, 70), (44, 128), (136, 188),
)  # fmt: skip
PCB_TRACES = (  # endpoints on pins, pads and vias; each is routed with one 45 degree bend
    ((107, 86), (146, 64)), ((107, 94), (146, 84)), ((107, 102), (146, 104)),
    ((107, 110), (126, 128)), ((158, 64), (190, 60)), ((158, 84), (202, 95)),
    ((158, 104), (186, 128)), ((94, 121), (134, 138)), ((134, 138), (148, 148)),
    ((184, 148), (186, 128)), ((86, 121), (104, 176)), ((104, 176), (100, 200)),
    ((78, 121), (72, 144)), ((56, 156), (64, 200)), ((72, 156), (76, 200)),
    ((65, 90), (44, 70)), ((65, 106), (44, 128)), ((98, 79), (120, 60)),
    ((172, 172), (190, 196)), ((148, 172), (136, 188)), ((112, 200), (136, 188)),
    ((202, 196), (212, 180)), ((212, 180), (200, 150)), ((202, 125), (200, 150)),
)  # fmt: skip


def _render_pcb(rng: Rng, size: int, restyle: Restyle) -> Image:
    """The board layout with small placement, print and solder-mask variation, and its pose."""
    scale = size / 256
    layer = np.empty((size, size, 3), np.uint8)  # uint8: cv2.putText draws on nothing else
    layer[:] = PCB_COLOURS["board"]
    alpha = np.zeros((size, size), np.float32)
    _box(alpha, *PCB_BOARD, 1.0, scale)
    for ends in PCB_TRACES:
        _line(layer, _route(*ends), PCB_COLOURS["trace"], 2.4, scale)
    _draw_holes(layer, alpha, scale)
    for chip in PCB_CHIPS:
        _draw_chip(layer, chip, rng.uniform(-0.5, 0.5, 2), scale)
    for passive in PCB_PASSIVES:
        _draw_passive(layer, passive, rng.uniform(-0.4, 0.4, 2), scale)
    _draw_can(layer, scale)
    _draw_silkscreen(layer, rng.uniform(-0.8, 0.8, 2), scale)
    board = restyle(layer.astype(np.float32)) + 3 * _mottle(rng, size, 16)[:, :, None]
    return _place(_plain(size, PCB_BACKGROUND, rng, 8), board, alpha, rng)


def _route(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    """Trace from a to b: straight along the longer axis, then a 45 degree run into b."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    delta = b - a
    major = int(abs(delta[1]) > abs(delta[0]))
    bend = a.copy()
    bend[major] = b[major] - np.sign(delta[major]) * abs(delta[1 - major])
    return np.stack([a, bend, b])


def _box(canvas: np.ndarray, centre, half, colour, scale: float) -> None:
    """Filled axis-aligned rectangle, sub-pixel accurate."""
    corners = np.asarray(centre) + np.asarray(half) * np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)])
    cv2.fillConvexPoly(canvas, _fixed(corners, scale), colour, cv2.LINE_AA, 4)


def _disc(canvas: np.ndarray, centre, radius: float, colour, scale: float) -> None:
    x, y = _fixed(centre, scale)
    cv2.circle(canvas, (int(x), int(y)), round(radius * scale * 16), colour, -1, cv2.LINE_AA, 4)


def _line(canvas: np.ndarray, path: np.ndarray, colour, width: float, scale: float) -> None:
    thickness = max(1, round(width * scale))
    cv2.polylines(canvas, [_fixed(path, scale)], False, colour, thickness, cv2.LINE_AA, 4)


def _text(canvas: np.ndarray, text: str, at, colour, height: float, scale: float) -> None:
    """Small print with its baseline starting at `at`."""
    x, y = np.rint(np.asarray(at, np.float64) * scale).astype(int)
    font = cv2.FONT_HERSHEY_PLAIN
    cv2.putText(canvas, text, (int(x), int(y)), font, height * scale, colour, 1, cv2.LINE_AA)


def _draw_holes(layer: np.ndarray, alpha: np.ndarray, scale: float) -> None:
    """Mounting holes, header pins and vias: tinned rings around see-through drill holes."""
    first, pitch, count = PCB_HEADER
    header = [(first[0] + pitch * k, first[1]) for k in range(count)]
    _box(layer, header[0], (4.2, 4.2), PCB_COLOURS["tin"], scale)  # square pin-1 pad
    rings = [(c, 6.5, 3.5) for c in PCB_MOUNTS] + [(c, 4.2, 1.8) for c in header]
    for centre, ring, drill in rings + [(c, 2.6, 1.1) for c in PCB_VIAS]:
        _disc(layer, centre, ring, PCB_COLOURS["tin"], scale)
        _disc(alpha, centre, drill, 0.0, scale)


def _draw_chip(layer: np.ndarray, chip: _Chip, shift: np.ndarray, scale: float) -> None:
    """An IC package: dark body, tinned gull-wing pins, pin-1 dot and a printed marking."""
    centre, half = np.asarray(chip.centre) + shift, np.asarray(chip.half, np.float64)
    for side in chip.sides:
        axis = 0 if side in "lr" else 1  # the axis the pins point along
        span = half[1 - axis] * 2 - 8
        for k in range(chip.pins):
            pin = centre.copy()
            pin[1 - axis] += span * (k / (chip.pins - 1) - 0.5)
            pin[axis] += (-1 if side in "lt" else 1) * (half[axis] + 3)
            _box(layer, pin, (3, 1) if axis == 0 else (1, 3), PCB_COLOURS["tin"], scale)
    _box(layer, centre, half, PCB_COLOURS["chip"], scale)
    _disc(layer, centre - half + 4, 1.6, PCB_COLOURS["print"], scale)
    _text(layer, chip.marking, centre + (8 - half[0], 3), PCB_COLOURS["print"], 0.7, scale)


def _draw_passive(layer: np.ndarray, part: _Passive, shift: np.ndarray, scale: float) -> None:
    """A 0805-style chip resistor or capacitor: tinned pads, body, end caps."""
    centre = np.asarray(part.centre) + shift
    along = np.array([0.0, 1.0]) if part.vertical else np.array([1.0, 0.0])
    across = along[::-1]
    tin = PCB_COLOURS["tin"]
    for sign in (-1, 1):
        _box(layer, centre + sign * 6 * along, 2.5 * along + 3.2 * across, tin, scale)
    _box(layer, centre, 5.5 * along + 2.6 * across, PCB_COLOURS[part.kind], scale)
    for sign in (-1, 1):
        _box(layer, centre + sign * 4.5 * along, 1.0 * along + 2.6 * across, tin, scale)


def _draw_can(layer: np.ndarray, scale: float) -> None:
    """A crystal in a metal can: darker rim, bright body, lengthwise glint."""
    centre, half = np.asarray(PCB_CAN[0]), np.asarray(PCB_CAN[1])
    _box(layer, centre, half + 1, PCB_COLOURS["can_rim"], scale)
    _box(layer, centre, half, PCB_COLOURS["can"], scale)
    _box(layer, centre - (2, 0), (1.2, half[1] - 2), PCB_COLOURS["glint"], scale)


def _draw_silkscreen(layer: np.ndarray, offset: np.ndarray, scale: float) -> None:
    """White outlines and reference designators, printed with a small registration error."""
    outlines = [
        (chip.centre, np.add(chip.half, (7 if "l" in chip.sides else 3, 7)), chip.label)
        for chip in PCB_CHIPS
    ]
    outlines += [(p.centre, (5, 10) if p.vertical else (10, 5), p.label) for p in PCB_PASSIVES]
    first, pitch, count = PCB_HEADER
    outlines.append(((first[0] + pitch * (count - 1) / 2, first[1]), (pitch * count / 2, 7), "J1"))
    silk = PCB_COLOURS["silk"]
    for centre, half, label in outlines:
        centre, half = np.asarray(centre) + offset, np.asarray(half)
        corners = centre + half * np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)])
        cv2.polylines(layer, [_fixed(corners, scale)], True, silk, 1, cv2.LINE_AA, 4)
        _text(layer, label, centre - half - (0, 2), silk, 0.6, scale)
    _text(layer, "GLAD-01 REV B", np.array([140, 216]) + offset, silk, 0.6, scale)


# --------------------------------------------------------------------------------------------
# Weave: 2/2 twill of round yarns, random phase, uneven yarns, slight waviness
# --------------------------------------------------------------------------------------------

WEAVE_WARP = (92, 110, 142)
WEAVE_WEFT = (150, 152, 160)
WEAVE_GAP = 18.0  # grey level between the yarns
WEAVE_PERIOD = 12.0  # px per yarn at 256
WEAVE_YARN = 0.8  # yarn width, in periods


def _render_weave(rng: Rng, size: int, restyle: Restyle) -> Image:
    """A patch of cloth: random phase, uneven yarns, fibre streaks and slight waviness."""
    period = WEAVE_PERIOD * size / 256
    column, warp_across, warp_gain = _yarns(rng, size, period)  # per image column
    row, weft_across, weft_gain = _yarns(rng, size, period)  # per image row
    warp = np.outer(_dip(weft_across), _bulge(warp_across) * warp_gain)
    weft = np.outer(_bulge(weft_across) * weft_gain, _dip(warp_across))
    warp_up = (column[None, :] - row[:, None]) % 4 < 2  # 2/2 twill
    warp_seen = (warp > 0) & (warp_up | (weft <= 0))
    warp_fibres, weft_fibres = _fibres(rng, size, period)
    warp = warp[:, :, None] * (np.asarray(WEAVE_WARP, np.float32) + warp_fibres[:, :, None])
    weft = weft[:, :, None] * (np.asarray(WEAVE_WEFT, np.float32) + weft_fibres[:, :, None])
    cloth = np.where(warp_seen[:, :, None], warp, weft) + np.float32(WEAVE_GAP)
    return restyle(_wobble(rng, cloth, 0.08 * period))


def _yarns(rng: Rng, size: int, period: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel line: yarn index, offset from that yarn's axis (in periods), yarn brightness.

    The phase is random per image; each yarn sits slightly off its nominal place and is
    slightly brighter or darker than its neighbours (uneven spinning and dyeing).
    """
    u = (np.arange(size, dtype=np.float32) + rng.uniform(0, 4 * period)) / period
    start = np.floor(u)
    index = start.astype(np.int32)
    shift = rng.normal(0, 0.05, 64).astype(np.float32)
    gain = rng.normal(1, 0.04, 64).astype(np.float32)
    return index, u - start - 0.5 - shift[index % 64], gain[index % 64]


def _bulge(across: np.ndarray) -> np.ndarray:
    """Brightness across a round yarn: 1 on its axis, 0 at its edges and in the gaps."""
    return np.sqrt(np.clip(1 - (2 * across / WEAVE_YARN) ** 2, 0, 1))


def _dip(along: np.ndarray) -> np.ndarray:
    """Brightness along a yarn: highest where it rides over a crossing yarn."""
    return 0.75 + 0.25 * np.cos(np.pi * along)


def _fibres(rng: Rng, size: int, period: float) -> tuple[np.ndarray, np.ndarray]:
    """Fine streaks along the vertical (warp) and horizontal (weft) yarns."""
    noise = _noise(rng, (2, size, size), 14)
    length = max(3, round(period))
    return cv2.blur(noise[0], (1, length)), cv2.blur(noise[1], (length, 1))


def _wobble(rng: Rng, image: Image, amplitude: float) -> Image:
    """Bend the image by a smooth random displacement of about `amplitude` pixels."""
    size = image.shape[0]
    grid = np.arange(size, dtype=np.float32)
    map_x = grid[None, :] + amplitude * _mottle(rng, size, 5)
    map_y = grid[:, None] + amplitude * _mottle(rng, size, 5)
    return cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


# --------------------------------------------------------------------------------------------
# Product variants: a normal change of the part's look, drawn on its layer before it is posed
# --------------------------------------------------------------------------------------------

BRASS = (1.1, 0.92, 0.6)  # channel gains that turn bright steel into brass
NUT_STAMP = ("A2-70", (110, 76), 0.7)  # text, baseline start (px at 256), height: stainless grade
PCB_LOGO = ("ACME 94V-0", (65, 53), 0.6, (58, 49), 3.5)  # text, start, height, dot centre, radius


def _restyle(category: str, variant: str | None) -> Restyle:
    """The layer change of `variant` for `category`; no change for None."""
    if variant is None:
        return _as_is
    if variant not in variants(category):
        raise ValueError(
            f"unknown variant {variant!r} for {category!r}: expected one of {list(variants(category))}"
        )
    return _RESTYLES[category][variant]


def _as_is(layer: Image) -> Image:
    """No variant: the layer unchanged."""
    return layer


def _colour_matrix(hue_degrees: float, gains: Colour = (1.0, 1.0, 1.0)) -> np.ndarray:
    """3x3 RGB matrix: rotate hue about the grey axis by `hue_degrees`, then scale the channels.

    A rotation about the grey axis keeps greys grey and brightness nearly so, so shading and texture
    survive; the gains tint even grey surfaces (steel, yarn).
    """
    turn = math.radians(hue_degrees)
    axis = np.full(3, 1 / math.sqrt(3))
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = math.cos(turn) * np.eye(3) + (1 - math.cos(turn)) * np.outer(axis, axis)
    rotation += math.sin(turn) * cross
    return (np.diag(gains) @ rotation).astype(np.float32)


def _recolour(layer: Image, matrix: np.ndarray) -> Image:
    """Every pixel of the layer through a colour matrix (see `_colour_matrix`)."""
    return np.clip(layer @ matrix.T, 0, 255)


def _lettering(size: int, text: str, at: Sequence[float], height: float) -> np.ndarray:
    """Coverage (float32, 0..1) of small print whose baseline starts at `at` (px of a 256 px image)."""
    canvas = np.zeros((size, size), np.uint8)
    _text(canvas, text, at, 255, height, size / 256)
    return canvas.astype(np.float32) / 255


def _relabel_nut(layer: Image) -> Image:
    """A material grade stamped into the flat face, between the grade marks; darker like them."""
    return _blend(layer, layer * 0.6, _lettering(layer.shape[0], *NUT_STAMP))


def _relabel_pcb(layer: Image) -> Image:
    """A maker's logo (a dot and a line of text) silkscreened in the free strip along the top edge."""
    text, at, height, dot, radius = PCB_LOGO
    size = layer.shape[0]
    alpha = _lettering(size, text, at, height)
    _disc(alpha, dot, radius, 1.0, size / 256)
    return _blend(layer, PCB_COLOURS["silk"], alpha)


# --------------------------------------------------------------------------------------------
# Where defects go, and their shapes
# --------------------------------------------------------------------------------------------


def _defect_region(image: np.ndarray, category: str) -> np.ndarray:
    """Pixels a defect may touch: the part itself for objects, all but a margin for textures."""
    region = _inner(image.shape[:2])
    return region & _part_mask(image) if CATEGORIES[category] == "object" else region


def _inner(shape: tuple[int, int]) -> np.ndarray:
    """All pixels but a margin of 3 % of the shorter side (at least 2 px): defects stay in view."""
    margin = max(2, round(0.03 * min(shape)))
    region = np.zeros(shape, bool)
    region[margin:-margin, margin:-margin] = True
    return region


def _side(image: np.ndarray) -> float:
    """Side of a square of the image's area: the length defect sizes scale with."""
    return math.sqrt(image.shape[0] * image.shape[1])


def _part_mask(image: np.ndarray) -> np.ndarray:
    """Foreground of an object image: pixels clearly unlike the background seen at the border."""
    smooth = cv2.GaussianBlur(image, (0, 0), 1.0).astype(np.float32)
    part = (np.abs(smooth - _border_colour(image)).max(axis=2) > 24).astype(np.uint8)
    part = cv2.morphologyEx(part, cv2.MORPH_CLOSE, _kernel(2))  # bridge dark thread grooves
    return cv2.morphologyEx(part, cv2.MORPH_OPEN, _kernel(1)).astype(bool)


def _border_colour(image: np.ndarray) -> np.ndarray:
    """Median colour of the outermost pixels: the background of an object image."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    return np.median(border, axis=0).astype(np.float32)


def _pick(rng: Rng, region: np.ndarray) -> np.ndarray:
    """A random (x, y) point of the region."""
    ys, xs = np.nonzero(region)
    k = rng.integers(len(xs))
    return np.array([xs[k], ys[k]], np.float64)


def _blob(rng: Rng, centre: np.ndarray, radius: float, roughness: float) -> np.ndarray:
    """Closed irregular outline: a circle whose radius wobbles by a few random harmonics."""
    angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    wobble = sum(
        rng.normal(0, roughness / k) * np.cos(k * angles + rng.uniform(0, 2 * np.pi))
        for k in range(2, 7)
    )
    radii = radius * np.clip(1 + wobble, 0.4, 1.6)
    return centre + radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _walk(
    rng: Rng,
    start: np.ndarray,
    heading: float,
    length: float,
    *,
    step: float,
    bend: float,
    jitter: float,
) -> np.ndarray:
    """Polyline from `start`: the heading turns by `bend` overall, plus `jitter` per step."""
    n = max(2, round(length / step))
    headings = heading + bend * np.linspace(-0.5, 0.5, n) + rng.normal(0, jitter, n)
    steps = step * np.stack([np.cos(headings), np.sin(headings)], axis=1)
    return np.vstack([start, start + np.cumsum(steps, axis=0)])


def _centred_walk(rng: Rng, centre: np.ndarray, length: float, **shape: float) -> np.ndarray:
    """A `_walk` in a random direction whose middle lies near `centre`."""
    heading = rng.uniform(0, 2 * np.pi)
    start = centre - 0.5 * length * np.array([np.cos(heading), np.sin(heading)])
    return _walk(rng, start, heading, length, **shape)


def _dome(shape: tuple[int, int], centre: np.ndarray, radius: float) -> np.ndarray:
    """Brightness factor of a small dome lit from `LIGHT_ANGLE`: above 1 on the lit side."""
    x = np.arange(shape[1], dtype=np.float32)[None, :] - centre[0]
    y = np.arange(shape[0], dtype=np.float32)[:, None] - centre[1]
    toward = (x * math.cos(LIGHT_ANGLE) + y * math.sin(LIGHT_ANGLE)) / radius
    return 1 + 0.45 * np.clip(toward, -1, 1)


# --------------------------------------------------------------------------------------------
# Defects: each returns the image with the defect drawn in (float32), inside `region`
# --------------------------------------------------------------------------------------------

METAL_SCRATCH = ((238, 238, 232), (52, 52, 56))  # a bright (polished) or dark (dirty) groove
COPPER_SCRATCH = ((214, 132, 72),)  # solder mask scratched down to the copper
DIRT = ((70, 48, 22), (40, 34, 28), (120, 100, 40))  # oil, grime, dust
FLUX = ((175, 145, 60), (125, 95, 40))  # solder flux residue, light and burnt
METAL_TINTS = ((1.25, 0.78, 0.45), (0.7, 0.82, 1.3), (1.2, 0.6, 1.05))  # rust, heat, paint
DYE_TINTS = ((1.5, 0.7, 0.45), (1.35, 1.2, 0.45), (0.8, 1.3, 0.6))  # red, yellow, green
FIBRES = ((40, 30, 25), (180, 40, 40), (235, 225, 200))


def _scratch(image: Image, region: np.ndarray, rng: Rng, colours: Sequence[Colour]) -> Image:
    """A thin, gently curved line in one of `colours`."""
    alpha = _scratch_stroke(image, region, rng)
    return _blend(image, colours[rng.integers(len(colours))], alpha * region)


def _scratch_stroke(image: Image, region: np.ndarray, rng: Rng) -> np.ndarray:
    """Coverage of a scratch: a thin, gently curved line about a point of the region."""
    size = _side(image)
    length = rng.uniform(0.35, 0.55) * size
    path = _centred_walk(
        rng, _pick(rng, region), length, step=3, bend=rng.uniform(-1, 1), jitter=0.04
    )
    return _stroke(image.shape[:2], [path], max(1, round(rng.uniform(1.6, 3.0) * size / 256)))


def _crack(image: Image, region: np.ndarray, rng: Rng) -> Image:
    """A dark jagged line with one or two side branches."""
    size = image.shape[0]
    length = rng.uniform(0.3, 0.45) * size
    paths = [_centred_walk(rng, _pick(rng, region), length, step=4, bend=0.4, jitter=0.35)]
    for _ in range(rng.integers(1, 3)):
        root = paths[0][rng.integers(len(paths[0]) // 4, 3 * len(paths[0]) // 4)]
        branch = rng.uniform(0.06, 0.12) * size
        heading = rng.uniform(0, 2 * np.pi)
        paths.append(_walk(rng, root, heading, branch, step=3, bend=0.3, jitter=0.35))
    alpha = _stroke(image.shape[:2], paths, max(1, round(2 * size / 256)))
    return _blend(image, image * 0.2, alpha * region)


def _hole(
    image: Image, region: np.ndarray, rng: Rng, *, inside: Colour, rim: float, roughness: float
) -> Image:
    """A round or ragged hole of `inside` colour, its rim brightened or darkened by `rim`."""
    centre = _pick(rng, region)
    radius = rng.uniform(0.035, 0.06) * image.shape[0]
    outline = _blob(rng, centre, radius, roughness)
    ring = _fill(image.shape[:2], centre + 1.35 * (outline - centre), blur=1.0)
    image = _blend(image, np.clip(image * rim, 0, 255), ring * region)
    depth = np.asarray(inside, np.float32) * (2 - _dome(image.shape[:2], centre, radius))[..., None]
    depth += _noise(rng, image.shape)
    return _blend(image, depth, _fill(image.shape[:2], outline) * region)


def _stain(image: Image, region: np.ndarray, rng: Rng, colours: Sequence[Colour]) -> Image:
    """A smooth, semi-transparent blob in one of `colours` (oil, flux residue, dirt)."""
    size = _side(image)
    outline = _blob(rng, _pick(rng, region), rng.uniform(0.05, 0.08) * size, 0.25)
    alpha = _fill(image.shape[:2], outline, blur=0.012 * size) * rng.uniform(0.75, 0.95)
    dirt = np.asarray(colours[rng.integers(len(colours))], np.float32)
    return _blend(image, image * 0.3 + dirt * 0.7, alpha * region)


def _tint(image: Image, region: np.ndarray, rng: Rng, tints: Sequence[Colour]) -> Image:
    """A patch of the surface in another colour, its texture kept (paint, heat tint, dye)."""
    size = image.shape[0]
    outline = _blob(rng, _pick(rng, region), rng.uniform(0.05, 0.08) * size, 0.2)
    alpha = _fill(image.shape[:2], outline, blur=0.006 * size)
    grey = image.mean(axis=2, keepdims=True)
    tinted = np.clip(grey * np.asarray(tints[rng.integers(len(tints))], np.float32), 0, 255)
    return _blend(image, tinted, alpha * region)


def _broken_corner(image: Image, region: np.ndarray, rng: Rng) -> Image:
    """A chunk broken off the part's outline along a jagged fracture; the background shows."""
    ys, xs = np.nonzero(region)
    centroid = np.array([xs.mean(), ys.mean()])
    heading = rng.uniform(0, 2 * np.pi)
    outward = np.array([np.cos(heading), np.sin(heading)])
    tangent = np.array([-outward[1], outward[0]])
    reach = ((np.stack([xs, ys], axis=1) - centroid) @ outward).max()
    depth = rng.uniform(0.04, 0.07) * image.shape[0]
    start = centroid + (reach - depth) * outward - reach * tangent
    fracture = _walk(rng, start, heading + np.pi / 2, 2 * reach, step=4, bend=0, jitter=0.35)
    chunk = np.vstack([fracture, fracture[::-1] + 2 * reach * outward])
    part = cv2.dilate(region.astype(np.uint8), _kernel(3 * image.shape[0] / 256))
    background = _border_colour(image) + _noise(rng, image.shape)
    return _blend(image, background, _fill(image.shape[:2], chunk) * part)


def _missing_component(image: Image, region: np.ndarray, rng: Rng) -> Image:
    """A chip package missing from the board: its body replaced by bare solder mask."""
    size = image.shape[0]
    scale = size / 256
    dark = ((image.max(axis=2) < 75) & region).astype(np.uint8)
    dark = cv2.morphologyEx(dark, cv2.MORPH_CLOSE, _kernel(2 * scale))  # across the marking
    count, labels, stats, _ = cv2.connectedComponentsWithStats(dark)
    bodies = [k for k in range(1, count) if stats[k, cv2.CC_STAT_AREA] >= 0.004 * size * size]
    if not bodies:
        raise ValueError("no chip package found on the board")
    body = np.argwhere(labels == bodies[rng.integers(len(bodies))])[:, ::-1].astype(np.float32)
    alpha = cv2.dilate(_fill(image.shape[:2], cv2.boxPoints(cv2.minAreaRect(body))), _kernel(1))
    beyond_pins = cv2.dilate(alpha, _kernel(12 * scale)) - cv2.dilate(alpha, _kernel(7 * scale))
    coloured = image.max(axis=2) - image.min(axis=2) > 30  # solder mask and traces, of any variant
    board = np.median(image[(beyond_pins > 0.5) & coloured], axis=0)
    return _blend(image, board + _noise(rng, image.shape), alpha)


def _solder_blob(image: Image, region: np.ndarray, rng: Rng) -> Image:
    """A splash of solder: a shiny, irregular silver blob."""
    centre = _pick(rng, region)
    radius = rng.uniform(0.035, 0.055) * image.shape[0]
    alpha = _fill(image.shape[:2], _blob(rng, centre, radius, 0.25))
    metal = 175 * _dome(image.shape[:2], centre, radius)[:, :, None] + _noise(rng, image.shape)
    return _blend(image, np.clip(metal, 0, 255) * np.float32([1.0, 1.0, 0.97]), alpha * region)


def _stray_thread(image: Image, region: np.ndarray, rng: Rng) -> Image:
    """A loose fibre lying on the fabric: a wavy, slightly fuzzy curve."""
    size = image.shape[0]
    length = rng.uniform(0.3, 0.5) * size
    path = _centred_walk(
        rng, _pick(rng, region), length, step=3, bend=rng.uniform(-2, 2), jitter=0.15
    )
    alpha = _stroke(image.shape[:2], [path], max(1, round(3 * size / 256)))
    alpha = np.clip(1.3 * cv2.GaussianBlur(alpha, (0, 0), 0.7), 0, 1)
    colour = np.asarray(FIBRES[rng.integers(len(FIBRES))], np.float32)
    return _blend(image, colour + _noise(rng, image.shape, 6), alpha * region)


# --------------------------------------------------------------------------------------------
# Canary defects: generic perturbations for an image of any product (see `paste_defect`)
# --------------------------------------------------------------------------------------------

CUT_PASTE_GAIN = (0.6, 1.4)  # per-channel colour jitter of a pasted patch
SCRATCH_GREYS = ((25, 25, 25), (235, 235, 235))  # for light and for dark surfaces


def _canary(image: Image, region: np.ndarray, rng: Rng) -> Image:
    """One of the generic perturbations, picked at random."""
    return _CANARIES[rng.integers(len(_CANARIES))](image, region, rng)


def _cut_paste(image: Image, region: np.ndarray, rng: Rng) -> Image:
    """CutPaste: a round patch from anywhere in the image, turned, maybe mirrored and recoloured.

    It is pasted with a soft edge about a point of the region: the product's own surface, out of place.
    """
    height, width = image.shape[:2]
    radius = rng.uniform(0.05, 0.09) * _side(image)
    target = _pick(rng, region)
    source = rng.uniform((radius, radius), (width - radius, height - radius))
    angle = rng.uniform(0, 2 * np.pi)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    turn = rotation @ np.diag([rng.choice([-1.0, 1.0]), 1.0])
    to_source = np.hstack([turn, (source - turn @ target)[:, None]])  # output pixel -> source point
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    patch = cv2.warpAffine(image, to_source, (width, height), flags=flags, borderMode=cv2.BORDER_REFLECT)
    patch = np.clip(patch * rng.uniform(*CUT_PASTE_GAIN, 3).astype(np.float32), 0, 255)
    alpha = _fill(image.shape[:2], _blob(rng, target, radius, 0.2), blur=0.01 * _side(image))
    return _blend(image, patch, alpha * region)


def _contrast_scratch(image: Image, region: np.ndarray, rng: Rng) -> Image:
    """A scratch in one grey that contrasts with the surface it crosses, whatever the product.

    Light if the pixels it covers are dark on average, dark if they are light.
    """
    alpha = _scratch_stroke(image, region, rng) * region
    under = (image.mean(axis=2) * alpha).sum() / max(alpha.sum(), 1e-6)
    return _blend(image, SCRATCH_GREYS[int(under < 128)], alpha)


# --------------------------------------------------------------------------------------------
# Registries
# --------------------------------------------------------------------------------------------

_RENDERERS: dict[str, Callable[[Rng, int, Restyle], Image]] = {
    "nut": _render_nut,
    "pcb": _render_pcb,
    "weave": _render_weave,
}

_DEFECTS: dict[str, dict[str, Callable[[Image, np.ndarray, Rng], Image]]] = {
    "nut": {
        "scratch": partial(_scratch, colours=METAL_SCRATCH),
        "crack": _crack,
        "hole": partial(_hole, inside=(60, 58, 56), rim=1.15, roughness=0.08),
        "missing": _broken_corner,
        "color": partial(_tint, tints=METAL_TINTS),
    },
    "pcb": {
        "scratch": partial(_scratch, colours=COPPER_SCRATCH),
        "missing": _missing_component,
        "extra": _solder_blob,
        "stain": partial(_stain, colours=FLUX),
    },
    "weave": {
        "hole": partial(_hole, inside=(22, 22, 26), rim=0.6, roughness=0.25),
        "stain": partial(_stain, colours=DIRT),
        "color": partial(_tint, tints=DYE_TINTS),
        "extra": _stray_thread,
    },
}

_RESTYLES: dict[str, dict[str, Restyle]] = {
    "nut": {
        "recoloured": partial(_recolour, matrix=_colour_matrix(0, BRASS)),
        "relabelled": _relabel_nut,
    },
    "pcb": {
        "recoloured": partial(_recolour, matrix=_colour_matrix(90)),  # green solder mask to blue
        "relabelled": _relabel_pcb,
    },
    "weave": {  # blue warp to red, grey weft to beige
        "recoloured": partial(_recolour, matrix=_colour_matrix(90, (1.1, 0.95, 0.75))),
    },
}

_CANARIES: tuple[Callable[[Image, np.ndarray, Rng], Image], ...] = (
    _cut_paste,
    _contrast_scratch,
    partial(_stain, colours=DIRT + FLUX),
)
