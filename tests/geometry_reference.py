"""Geometry helpers only the tests use: composing and applying affines, and independent references for the
sampler's crop window and the kernel's overlap count."""

from __future__ import annotations

import numpy as np

from densessl.pipeline.geometry import Crop, _crop_window


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """``outer o inner``: apply ``inner`` first."""
    return np.concatenate([outer[:, :2] @ inner[:, :2], outer[:, :2] @ inner[:, 2:3] + outer[:, 2:3]], axis=1)


def apply_affine(a: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Map points ``[..., 2]`` (x, y) through a 2x3 affine."""
    return xy @ a[:, :2].T + a[:, 2]


def sample_crop_window(seed: int, height: int, width: int, scale=(0.2, 1.0),
                       ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) with torchvision ``RandomResizedCrop.get_params`` semantics, from an integer seed."""
    return tuple(int(v) for v in _crop_window(np.uint64(seed), height, width, *scale, *ratio)[1:])


def axis_overlap(p1: float, l1: float, p2: float, l2: float, cells: int, mirrored: float) -> float:
    """Exact count of view-1 grid cells along one axis whose centre lands inside view 2.

    Crop 1 spans source [p1, p1 + l1) with ``cells`` grid cells; cell c's centre is p1 + (c + 0.5) * l1 / cells.
    View 2 covers [0, W) in its own coordinates: source [p2, p2 + l2), or (p2, p2 + l2] when ``mirrored`` (1.0)
    since a flip turns the open edge around. The conditions are integer arithmetic, and floors and ceilings of
    ratios of integers are exact in float64: an independent check of the kernel's floating-point count.
    """
    a = (2 * (p2 - p1) * cells - l1) / (2 * l1)
    b = (2 * (p2 + l2 - p1) * cells - l1) / (2 * l1)
    lo = mirrored * (np.floor(a) + 1) + (1 - mirrored) * np.ceil(a)
    hi = mirrored * (np.floor(b) + 1) + (1 - mirrored) * np.ceil(b)
    return max(min(hi, cells) - max(lo, 0), 0)


def crop_overlap_cells(c1: Crop, c2: Crop, view_hw=(224, 224), stride: int = 4) -> int:
    """View-1 grid cells (of ``view_hw / stride``) that fall inside view 2: equals ``count_valid`` for crops."""
    f = np.float64
    ny = axis_overlap(f(c1.top), f(c1.height), f(c2.top), f(c2.height), view_hw[0] // stride, 0.0)
    nx = axis_overlap(f(c1.left), f(c1.width), f(c2.left), f(c2.width), view_hw[1] // stride, f(c2.flip))
    return int(nx * ny)
