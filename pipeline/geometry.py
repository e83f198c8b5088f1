"""View geometry: every view is a 2x3 affine map from source pixel coordinates to view pixel coordinates.

Coordinates are continuous (x, y) = (column, row). Pixel (r, c) covers [c, c+1) x [r, r+1) and has its centre
at (c + 0.5, r + 0.5); this is the half-pixel convention of PIL, OpenCV, DALI and torch's antialiased resize, so
a crop box resized to the view size is exactly the affine returned by ``crop_affine``.

Random views follow torchvision's ``RandomResizedCrop`` (including its 10-try loop and centre-crop fallback)
and ``RandomHorizontalFlip``, drawn by one Numba function (``draw_views``) from a splitmix64 stream seeded per
sample, so the reference loader and the compiled loaders (FFCV's decoder, DALI's graph) share one sampler and
reproduce each other's views.

The sampler draws the groups of a ``ViewSpec`` in order. A group with a rule among its own views is drawn whole,
and redrawn whole until every rule it is part of holds (a view pair's rule); any other group draws each view on
its own and redraws that view until its rules with earlier groups hold (Leopart's rule). After ``max_tries``
draws, a view falls back to a window built from the views drawn before it that its rules name: inside every
partner it is matched from, and around every partner matched into it, so every cell a rule counts is shared and
its matches can always be drawn (``min_area`` may then not hold); a group drawn whole falls back as one window.
With no such partner (a view pair), a view takes its group's first window, with its own flip. ``tries`` is
then 0. Each constrained pair then gets a match seed from the same stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numba import njit

from .correspondence import _INV_2_53, count_shared, splitmix64

if TYPE_CHECKING:
    from .views import PairSpec, ViewSpec


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


@njit(inline="always")
def _pair_holds(windows, sizes, i, j, min_cells, min_area, height, width, stride):
    if min_cells > 0:
        a1 = _crop_matrix(windows[i, 0], windows[i, 1], windows[i, 2], windows[i, 3], windows[i, 4] != 0,
                          sizes[i, 0], sizes[i, 1])
        a2 = _crop_matrix(windows[j, 0], windows[j, 1], windows[j, 2], windows[j, 3], windows[j, 4] != 0,
                          sizes[j, 0], sizes[j, 1])
        if count_shared(a1, a2, sizes[i, 0] // stride, sizes[i, 1] // stride, sizes[j, 0] // stride,
                        sizes[j, 1] // stride, float(stride)) < min_cells:
            return False
    if min_area > 0:
        dy = min(windows[i, 0] + windows[i, 2], windows[j, 0] + windows[j, 2]) - max(windows[i, 0], windows[j, 0])
        dx = min(windows[i, 1] + windows[i, 3], windows[j, 1] + windows[j, 3]) - max(windows[i, 1], windows[j, 1])
        if max(dy, 0) * max(dx, 0) < min_area * height * width:
            return False
    return True


@njit(inline="always")
def _draw(state, windows, crops, v, height, width):
    state, t, l, h, w = _crop_window(state, height, width, crops[v, 0], crops[v, 1], crops[v, 2], crops[v, 3])
    state, u = _uniform(state)
    windows[v, 0], windows[v, 1], windows[v, 2], windows[v, 3] = t, l, h, w
    windows[v, 4] = 1 if u < crops[v, 4] else 0
    return state


@njit(inline="always")
def _fall_back(windows, pair_views, v, drawn_until, own):
    """View ``v``'s fallback window, from the views drawn before ``drawn_until`` that a rule pairs it with: inside
    every partner whose view it is matched from (a rule ``(v, partner)`` counts ``v``'s cells), and around every
    partner matched into it (a rule ``(partner, v)``), so every cell a rule counts is shared whatever the views'
    sizes. With no such partner, or when no window can do both, ``v`` takes view ``own``'s window."""
    it, il, ib, ir, inner = 0, 0, 0, 0, False  # intersection of the partners v must lie inside
    ut, ul, ub, ur, outer = 0, 0, 0, 0, False  # union box of the partners v must contain
    for p in range(pair_views.shape[0]):
        i, j = pair_views[p, 0], pair_views[p, 1]
        o = j if i == v else i if j == v else -1
        if o < 0 or o >= drawn_until:
            continue
        t, l, b, r = windows[o, 0], windows[o, 1], windows[o, 0] + windows[o, 2], windows[o, 1] + windows[o, 3]
        if i == v:
            it, il, ib, ir = (t, l, b, r) if not inner else (max(it, t), max(il, l), min(ib, b), min(ir, r))
            inner = True
        else:
            ut, ul, ub, ur = (t, l, b, r) if not outer else (min(ut, t), min(ul, l), max(ub, b), max(ur, r))
            outer = True
    if outer and (not inner or (it <= ut and il <= ul and ub <= ib and ur <= ir)):
        windows[v, 0], windows[v, 1], windows[v, 2], windows[v, 3] = ut, ul, ub - ut, ur - ul
    elif inner and ib > it and ir > il and not outer:
        windows[v, 0], windows[v, 1], windows[v, 2], windows[v, 3] = it, il, ib - it, ir - il
    elif v != own:
        windows[v, 0:4] = windows[own, 0:4]


@njit(inline="always")
def _view_holds(windows, sizes, pair_views, cells, area, v, drawn_until, height, width, stride):
    """Every rule of view ``v`` with a view drawn before ``drawn_until`` (or ``v``'s own group, drawn) holds."""
    for p in range(pair_views.shape[0]):
        i, j = pair_views[p, 0], pair_views[p, 1]
        if (i == v and j < drawn_until) or (j == v and i < drawn_until):
            if not _pair_holds(windows, sizes, i, j, cells[p], area[p], height, width, stride):
                return False
    return True


@njit(cache=True)
def draw_views(seed, height, width, first, counts, sizes, crops, pair_views, cells, area, joint, fallback,
                      stride, max_tries):
    """The view sampler (module docstring), callable from compiled loaders (FFCV's decoder, DALI's graph).
    Returns int64 ``[V,6]`` (top, left, h, w, flip, tries) per view and uint64 ``[P]`` match seeds per
    constrained pair. ``max_tries=0``: every view is drawn once and takes its fallback window
    (``PairSpec.same_window``)."""
    n_views = sizes.shape[0]
    windows = np.zeros((n_views, 6), np.int64)
    state = np.uint64(seed)
    for g in range(first.shape[0]):
        lo, hi = first[g], first[g] + counts[g]
        if joint[g]:  # drawn whole until every rule of the group holds
            ok = False
            for attempt in range(1, max(max_tries, 1) + 1):
                for v in range(lo, hi):
                    state = _draw(state, windows, crops, v, height, width)
                ok = max_tries > 0
                for v in range(lo, hi):
                    if not _view_holds(windows, sizes, pair_views, cells, area, v, hi, height, width, stride):
                        ok = False
                        break
                if ok:
                    for v in range(lo, hi):
                        windows[v, 5] = attempt
                    break
            if not ok:  # every view shares one window: inside the earlier partners, or the first view's
                _fall_back(windows, pair_views, lo, lo, lo)
                for v in range(lo + 1, hi):
                    windows[v, 0:4] = windows[lo, 0:4]
        else:  # each view on its own, against the groups drawn before it
            for v in range(lo, hi):
                ok = False
                for attempt in range(1, max(max_tries, 1) + 1):
                    state = _draw(state, windows, crops, v, height, width)
                    if max_tries > 0 and _view_holds(windows, sizes, pair_views, cells, area, v, lo, height, width,
                                                     stride):
                        windows[v, 5] = attempt
                        ok = True
                        break
                if not ok:
                    _fall_back(windows, pair_views, v, lo, fallback[g])
    seeds = np.empty(pair_views.shape[0], np.uint64)
    for p in range(pair_views.shape[0]):  # the first pair's seed is the stream's state, as for view pairs
        seeds[p] = state
        state, _ = splitmix64(state)
    return windows, seeds


def view_params(seed: int, height: int, width: int, spec: ViewSpec) -> tuple[np.ndarray, np.ndarray]:
    """``draw_views`` for one image of ``height`` x ``width`` pixels."""
    if height <= 0 or width <= 0:
        raise ValueError(f"source image has no pixels ({height}x{width})")
    return draw_views(np.uint64(seed), height, width, *spec.arrays)


@dataclass(frozen=True)
class ViewPair:
    crop1: Crop
    crop2: Crop
    affine1: np.ndarray
    affine2: np.ndarray
    tries: int  # draws needed to reach min_matches; 0 means the same-window fallback was used
    match_seed: int  # continues the pair's random stream: seeds its matches


def sample_view_pair(seed: int, height: int, width: int, spec: PairSpec) -> ViewPair:
    """Two random views (from an integer seed) that share at least ``spec.min_matches`` feature-grid cells.

    Pairs are redrawn whole (both views) until they overlap enough, so accepted pairs follow the
    RandomResizedCrop distribution conditioned on overlap. After ``spec.max_tries`` failures (tiny or extreme
    images) view 2 reuses view 1's window with its own flip, which always overlaps fully.
    """
    windows, seeds = view_params(seed, height, width, spec.view_spec)
    c1, c2 = (Crop(*map(int, w[:4]), bool(w[4])) for w in windows)
    return ViewPair(c1, c2, crop_affine(c1, spec.size), crop_affine(c2, spec.size), int(windows[0, 5]),
                    int(seeds[0]))
