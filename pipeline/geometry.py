"""View geometry: every view is a 2x3 affine map from source pixel coordinates to view pixel coordinates.

Coordinates are continuous (x, y) = (column, row). Pixel (r, c) covers [c, c+1) x [r, r+1) and has its centre
at (c + 0.5, r + 0.5); this is the half-pixel convention of PIL, OpenCV, DALI and torch's antialiased resize, so
a crop box resized to the view size is exactly the affine returned by ``crop_affine``.

Random views follow torchvision's ``RandomResizedCrop`` (including its 10-try loop and centre-crop fallback)
and ``RandomHorizontalFlip``, drawn from a numpy ``Generator`` so every loader backend can reproduce them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .correspondence import count_valid


@dataclass(frozen=True)
class ViewSpec:
    """How one random view is cut: output size (H, W), RandomResizedCrop scale/ratio, flip probability."""

    size: tuple[int, int] = (224, 224)
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5

    def __post_init__(self):
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")
        if not (0 <= self.flip_p <= 1):
            raise ValueError(f"flip_p must be a probability, got {self.flip_p}")
        if min(self.size) <= 0:
            raise ValueError(f"view size must be positive, got {self.size}")


@dataclass(frozen=True)
class Crop:
    """A crop window in source pixels plus the flip applied after resizing it to the view."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


def crop_affines(top, left, height, width, flip, out_hw: tuple[int, int]) -> np.ndarray:
    """``[B,2,3]`` source->view matrices of resizing crop windows to ``out_hw`` and then flipping those with
    ``flip`` set (arrays of length B)."""
    top, left, height, width = (np.asarray(v, np.float64).reshape(-1) for v in (top, left, height, width))
    sx, sy = out_hw[1] / width, out_hw[0] / height
    mirrored = np.asarray(flip).reshape(-1) > 0
    out = np.zeros((len(top), 2, 3))
    out[:, 0, 0] = np.where(mirrored, -sx, sx)
    out[:, 0, 2] = np.where(mirrored, out_hw[1] + left * sx, -left * sx)  # flipped: x' = W - (x - left) * sx
    out[:, 1, 1] = sy
    out[:, 1, 2] = -top * sy
    return out


def crop_affine(crop: Crop, out_hw: tuple[int, int]) -> np.ndarray:
    """The 2x3 source->view matrix of resizing ``crop`` to ``out_hw`` and then (optionally) flipping it."""
    return crop_affines(crop.top, crop.left, crop.height, crop.width, crop.flip, out_hw)[0]


def invert_affine(a: np.ndarray) -> np.ndarray:
    """Inverse of a 2x3 affine (view -> source for a view matrix)."""
    lin = np.linalg.inv(a[:2, :2])
    return np.concatenate([lin, -lin @ a[:2, 2:3]], axis=1)


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """``outer o inner``: apply ``inner`` first."""
    return np.concatenate([outer[:, :2] @ inner[:, :2], outer[:, :2] @ inner[:, 2:3] + outer[:, 2:3]], axis=1)


def apply_affine(a: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Map points ``[..., 2]`` (x, y) through a 2x3 affine."""
    return xy @ a[:, :2].T + a[:, 2]


def sample_crop_window(rng: np.random.Generator, height: int, width: int,
                       scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) with torchvision ``RandomResizedCrop.get_params`` semantics."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height  # fallback: the largest centre crop within the ratio range
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_crop(rng: np.random.Generator, height: int, width: int, spec: ViewSpec) -> Crop:
    top, left, h, w = sample_crop_window(rng, height, width, spec.scale, spec.ratio)
    return Crop(top, left, h, w, bool(rng.random() < spec.flip_p))


def axis_overlap(p1, l1, p2, l2, cells, mirrored, floor, ceil, minimum, maximum):
    """Exact count of view-1 grid cells along one axis whose centre lands inside view 2.

    Crop 1 spans source [p1, p1 + l1) with ``cells`` grid cells; cell c's centre is p1 + (c + 0.5) * l1 / cells.
    View 2 covers [0, W) in its own coordinates: source [p2, p2 + l2), or (p2, p2 + l2] when ``mirrored`` (1.0)
    since a flip turns the open edge around. The conditions are integer arithmetic, and floors and ceilings of
    ratios of integers are exact in float64. The array library's ops are passed in (numpy here,
    ``nvidia.dali.math`` inside a DALI graph) so both evaluate this one formula.
    """
    a = (2 * (p2 - p1) * cells - l1) / (2 * l1)
    b = (2 * (p2 + l2 - p1) * cells - l1) / (2 * l1)
    lo = mirrored * (floor(a) + 1) + (1 - mirrored) * ceil(a)
    hi = mirrored * (floor(b) + 1) + (1 - mirrored) * ceil(b)
    return maximum(minimum(hi, cells) - maximum(lo, 0), 0)


def crop_overlap_cells(c1: Crop, c2: Crop, view_hw=(224, 224), stride: int = 4) -> int:
    """View-1 grid cells (of ``view_hw / stride``) that fall inside view 2: equals ``count_valid`` for crops."""
    f, ops = np.float64, (np.floor, np.ceil, np.minimum, np.maximum)
    ny = axis_overlap(f(c1.top), f(c1.height), f(c2.top), f(c2.height), view_hw[0] // stride, 0.0, *ops)
    nx = axis_overlap(f(c1.left), f(c1.width), f(c2.left), f(c2.width), view_hw[1] // stride, f(c2.flip), *ops)
    return int(nx * ny)


@dataclass(frozen=True)
class ViewPair:
    crop1: Crop
    crop2: Crop
    affine1: np.ndarray
    affine2: np.ndarray
    tries: int  # draws needed to reach min_matches; 0 means the same-window fallback was used


def sample_view_pair(rng: np.random.Generator, height: int, width: int, spec: ViewSpec = ViewSpec(),
                     min_matches: int = 32, stride: int = 4, max_tries: int = 50) -> ViewPair:
    """Two random views that share at least ``min_matches`` feature-grid cells.

    Pairs are redrawn whole (both views) until they overlap enough, so accepted pairs follow the
    RandomResizedCrop distribution conditioned on overlap. After ``max_tries`` failures (tiny or extreme
    images) view 2 reuses view 1's window with its own flip, which always overlaps fully.
    """
    gh, gw = spec.size[0] // stride, spec.size[1] // stride
    if not 0 < min_matches <= gh * gw:
        raise ValueError(f"min_matches={min_matches} is impossible on a {gh}x{gw} feature grid")
    if height <= 0 or width <= 0:
        raise ValueError(f"source image has no pixels ({height}x{width})")
    for attempt in range(1, max_tries + 1):
        c1 = sample_crop(rng, height, width, spec)
        c2 = sample_crop(rng, height, width, spec)
        a1, a2 = crop_affine(c1, spec.size), crop_affine(c2, spec.size)
        if count_valid(a1, a2, gh, gw, float(stride)) >= min_matches:
            return ViewPair(c1, c2, a1, a2, attempt)
    c2 = Crop(c1.top, c1.left, c1.height, c1.width, bool(rng.random() < spec.flip_p))
    return ViewPair(c1, c2, a1, crop_affine(c2, spec.size), 0)
