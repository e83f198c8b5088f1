"""View geometry: every view is a 2x3 affine map from source pixel coordinates to view pixel coordinates.

Coordinates are continuous (x, y) = (column, row). Pixel (r, c) covers [c, c+1) x [r, r+1) and has its centre
at (c + 0.5, r + 0.5); this is the half-pixel convention of PIL, OpenCV, DALI and torch's antialiased resize, so
a crop box resized to the view size is exactly the affine returned by ``crop_affine``.

Random views follow torchvision's ``RandomResizedCrop`` (including its 10-try loop and centre-crop fallback)
and ``RandomHorizontalFlip``, drawn by a Numba function from a splitmix64 stream seeded per sample, so the
reference loader and compiled loaders (FFCV decoders) share one sampler and reproduce each other's views.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numba import njit

from .correspondence import _INV_2_53, count_valid, splitmix64

if TYPE_CHECKING:
    from .contract import PairSpec


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
    cols = [np.asarray(v).reshape(-1) for v in (top, left, height, width, flip)]
    return _crop_matrices(*(c.astype(np.float64) for c in cols[:4]), cols[4] > 0, out_hw[0], out_hw[1])


def crop_affine(crop: Crop, out_hw: tuple[int, int]) -> np.ndarray:
    """The 2x3 source->view matrix of resizing ``crop`` to ``out_hw`` and then (optionally) flipping it."""
    return _crop_matrix(crop.top, crop.left, crop.height, crop.width, crop.flip, out_hw[0], out_hw[1])


def invert_affine(a: np.ndarray) -> np.ndarray:
    """Inverse of a 2x3 affine (view -> source for a view matrix)."""
    lin = np.linalg.inv(a[:2, :2])
    return np.concatenate([lin, -lin @ a[:2, 2:3]], axis=1)


@njit(inline="always")
def _uniform(state):
    state, bits = splitmix64(state)
    return state, (bits >> np.uint64(11)) * _INV_2_53


@njit(cache=True)
def _crop_window(state, height, width, scale_lo, scale_hi, ratio_lo, ratio_hi):
    """torchvision ``RandomResizedCrop.get_params`` semantics on a splitmix64 stream: (state, top, left, h, w)."""
    area = height * width
    log_lo, log_hi = np.log(ratio_lo), np.log(ratio_hi)
    for _ in range(10):
        state, u = _uniform(state)
        target_area = area * (scale_lo + (scale_hi - scale_lo) * u)
        state, u = _uniform(state)
        aspect = np.exp(log_lo + (log_hi - log_lo) * u)
        w = int(round(np.sqrt(target_area * aspect)))
        h = int(round(np.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            state, u = _uniform(state)
            top = int(u * (height - h + 1))
            state, u = _uniform(state)
            return state, top, int(u * (width - w + 1)), h, w
    in_ratio = width / height  # fallback: the largest centre crop within the ratio range
    if in_ratio < ratio_lo:
        w, h = width, int(round(width / ratio_lo))
    elif in_ratio > ratio_hi:
        h, w = height, int(round(height * ratio_hi))
    else:
        w, h = width, height
    return state, (height - h) // 2, (width - w) // 2, h, w


@njit(cache=True)
def _crop_matrix(top, left, h, w, flip, out_h, out_w):
    """The source->view matrix of one crop window resized to (out_h, out_w), then flipped if ``flip``."""
    a = np.zeros((2, 3))
    sx, sy = out_w / w, out_h / h
    a[0, 0] = -sx if flip else sx
    a[0, 2] = out_w + left * sx if flip else -left * sx  # flipped: x' = W - (x - left) * sx
    a[1, 1] = sy
    a[1, 2] = -top * sy
    return a


@njit(cache=True)
def _crop_matrices(top, left, h, w, flip, out_h, out_w):
    out = np.empty((len(top), 2, 3))
    for i in range(len(top)):
        out[i] = _crop_matrix(top[i], left[i], h[i], w[i], flip[i], out_h, out_w)
    return out


@njit(cache=True)
def view_pair_params(seed, height, width, out_h, out_w, scale_lo, scale_hi, ratio_lo, ratio_hi, flip_p,
                     min_matches, stride, max_tries):
    """The view-pair sampler as a Numba function, callable from other compiled loaders (FFCV decoders).

    Returns int64[12]: top, left, h, w, flip of view 1 and of view 2, the draws needed (0: fallback), and the
    stream's next state (the seed for this pair's matches; reinterpret as uint64). ``max_tries=0``: one draw,
    then the fallback always (``PairSpec.same_window``).
    """
    state = np.uint64(seed)
    out = np.zeros(12, np.int64)
    gh, gw = out_h // stride, out_w // stride
    for attempt in range(1, max(max_tries, 1) + 1):
        state, t1, l1, h1, w1 = _crop_window(state, height, width, scale_lo, scale_hi, ratio_lo, ratio_hi)
        state, u1 = _uniform(state)
        state, t2, l2, h2, w2 = _crop_window(state, height, width, scale_lo, scale_hi, ratio_lo, ratio_hi)
        state, u2 = _uniform(state)
        f1, f2 = u1 < flip_p, u2 < flip_p
        a1 = _crop_matrix(t1, l1, h1, w1, f1, out_h, out_w)
        a2 = _crop_matrix(t2, l2, h2, w2, f2, out_h, out_w)
        if max_tries > 0 and count_valid(a1, a2, gh, gw, float(stride)) >= min_matches:
            out[10] = attempt
            break
    else:  # view 2 reuses view 1's window (full overlap) with its own flip
        t2, l2, h2, w2 = t1, l1, h1, w1
    out[0], out[1], out[2], out[3], out[4] = t1, l1, h1, w1, f1
    out[5], out[6], out[7], out[8], out[9] = t2, l2, h2, w2, f2
    out[11] = np.int64(state)
    return out


@njit(cache=True)
def window_union(params):
    """(top, left, height, width) of the smallest box holding both windows of a row of ``view_pair_params``:
    what a loader that decodes only part of an image must decode."""
    top, left = min(params[0], params[5]), min(params[1], params[6])
    bottom = max(params[0] + params[2], params[5] + params[7])
    right = max(params[1] + params[3], params[6] + params[8])
    return top, left, bottom - top, right - left


@dataclass(frozen=True)
class ViewPair:
    crop1: Crop
    crop2: Crop
    affine1: np.ndarray
    affine2: np.ndarray
    tries: int  # draws needed to reach min_matches; 0 means the same-window fallback was used
    match_seed: int  # continues the pair's random stream: seeds its matches


def pair_params(seed: int, height: int, width: int, spec: PairSpec) -> np.ndarray:
    """``view_pair_params`` for one image of ``height`` x ``width`` pixels: int64[12] (``contract.PARAMS``)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"source image has no pixels ({height}x{width})")
    return view_pair_params(np.uint64(seed), height, width, *spec.sampler_args())


def sample_view_pair(seed: int, height: int, width: int, spec: PairSpec) -> ViewPair:
    """Two random views (from an integer seed) that share at least ``spec.min_matches`` feature-grid cells.

    Pairs are redrawn whole (both views) until they overlap enough, so accepted pairs follow the
    RandomResizedCrop distribution conditioned on overlap. After ``spec.max_tries`` failures (tiny or extreme
    images) view 2 reuses view 1's window with its own flip, which always overlaps fully.
    """
    p = pair_params(seed, height, width, spec)
    c1, c2 = Crop(*map(int, p[:4]), bool(p[4])), Crop(*map(int, p[5:9]), bool(p[9]))
    return ViewPair(c1, c2, crop_affine(c1, spec.size), crop_affine(c2, spec.size), int(p[10]),
                    int(np.int64(p[11]).view(np.uint64)))
