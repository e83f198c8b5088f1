"""Numba kernels: pixel correspondence between two views of one image.

Each view is a 2x3 affine map from source pixel coordinates to view pixel coordinates (see ``geometry``).
The composition ``A2 o inv(A1)`` maps view 1 to view 2, so correspondence needs only the two matrices:
no image, no per-pixel lookup table.

Grid coordinates are continuous feature-grid coordinates: grid cell (r, c) of a view with feature stride ``s``
covers view pixels [c*s, (c+1)*s) x [r*s, (r+1)*s) and has its centre at (c+0.5, r+0.5). A view-2 grid position
(x, y) therefore lies in cell (floor(y), floor(x)), and ``2*xy/grid_wh - 1`` is its ``grid_sample`` coordinate
with ``align_corners=False``.

Sampling uses a counter-free splitmix64 stream seeded per pair, so results depend only on the seeds, never on
thread scheduling or the number of workers.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_INV_2_53 = 1.0 / 9007199254740992.0
# Border tolerance in grid units. A crop pair's cell centre can land exactly on view 2's border; composing the
# two affines in floating point then lands a hair to either side. Deciding such ties as exact arithmetic would
# (left/top edge inside, right/bottom edge outside) makes the count here equal the exact integer count that
# other backends (DALI) compute in-graph. Exact non-tie distances are far larger (>= 1e-8 for 40,000 px images).
_TIE = 1e-9


@njit(inline="always")
def splitmix64(state):
    """Advance a splitmix64 state; returns (new_state, 64 random bits)."""
    state = state + _GOLDEN
    z = state
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return state, z ^ (z >> np.uint64(31))


@njit(inline="always")
def _inside(x, y, grid_w, grid_h):
    return -_TIE <= x < grid_w - _TIE and -_TIE <= y < grid_h - _TIE


@njit(inline="always")
def _grid_map(a1, a2, stride):
    """The view-1-grid -> view-2-grid affine (6 coefficients) for one pair of 2x3 view matrices."""
    det = a1[0, 0] * a1[1, 1] - a1[0, 1] * a1[1, 0]
    # inverse of A1 (view-1 px -> source px)
    i00 = a1[1, 1] / det
    i01 = -a1[0, 1] / det
    i10 = -a1[1, 0] / det
    i11 = a1[0, 0] / det
    i02 = -(i00 * a1[0, 2] + i01 * a1[1, 2])
    i12 = -(i10 * a1[0, 2] + i11 * a1[1, 2])
    # M = A2 o inv(A1) (view-1 px -> view-2 px)
    m00 = a2[0, 0] * i00 + a2[0, 1] * i10
    m01 = a2[0, 0] * i01 + a2[0, 1] * i11
    m02 = a2[0, 0] * i02 + a2[0, 1] * i12 + a2[0, 2]
    m10 = a2[1, 0] * i00 + a2[1, 1] * i10
    m11 = a2[1, 0] * i01 + a2[1, 1] * i11
    m12 = a2[1, 0] * i02 + a2[1, 1] * i12 + a2[1, 2]
    # in grid units the linear part is unchanged and the translation is divided by the stride
    return m00, m01, m02 / stride, m10, m11, m12 / stride


@njit(inline="always")
def _flow_pair(a1, a2, grid_h, grid_w, grid_h2, grid_w2, stride, out):
    m00, m01, m02, m10, m11, m12 = _grid_map(a1, a2, stride)
    for r in range(grid_h):
        y1 = r + 0.5
        for c in range(grid_w):
            x1 = c + 0.5
            x2 = m00 * x1 + m01 * y1 + m02
            y2 = m10 * x1 + m11 * y1 + m12
            if _inside(x2, y2, grid_w2, grid_h2):
                out[r, c, 0] = x2
                out[r, c, 1] = y2
            else:
                out[r, c, 0] = np.nan
                out[r, c, 1] = np.nan


@njit(inline="always")
def _collect_valid(a1, a2, grid_h, grid_w, grid_h2, grid_w2, stride, buf):
    """Write flat view-1 indices of cells whose centre lands inside view 2 (a ``grid_h2`` x ``grid_w2`` grid)
    into buf; return their count."""
    m00, m01, m02, m10, m11, m12 = _grid_map(a1, a2, stride)
    n = 0
    for r in range(grid_h):
        y1 = r + 0.5
        bx = m01 * y1 + m02
        by = m11 * y1 + m12
        for c in range(grid_w):
            x1 = c + 0.5
            x2 = m00 * x1 + bx
            y2 = m10 * x1 + by
            if _inside(x2, y2, grid_w2, grid_h2):
                buf[n] = r * grid_w + c
                n += 1
    return n


@njit(cache=True)
def count_valid(a1, a2, grid_h, grid_w, stride):
    """Number of view-1 grid cells whose centre falls inside view 2 (one pair of views of one size)."""
    buf = np.empty(grid_h * grid_w, np.int32)
    return _collect_valid(a1, a2, grid_h, grid_w, grid_h, grid_w, stride, buf)


@njit(cache=True)
def count_shared(a1, a2, grid_h, grid_w, grid_h2, grid_w2, stride):
    """``count_valid`` for views of two sizes: view 1's grid is ``grid_h`` x ``grid_w``, view 2's the other."""
    buf = np.empty(grid_h * grid_w, np.int32)
    return _collect_valid(a1, a2, grid_h, grid_w, grid_h2, grid_w2, stride, buf)


@njit(inline="always")
def _cell(v, cells):
    """The grid cell holding position ``v``; the border tolerance's slivers (just below 0, just below ``cells``)
    belong to the outer cells."""
    return min(max(int(np.floor(v)), 0), cells - 1)


@njit(inline="always")
def _inside_cell(v, cell):
    """``v`` as float32, kept in [cell, cell + 1): rounding a float64 position to float32 can carry it onto the
    next cell's edge, and the contract says the view-2 cell is ``floor(match_xy2)``."""
    f = np.float32(v)
    if f < cell:
        return np.float32(cell)
    edge = np.float32(cell + 1)
    if f >= edge:
        return np.nextafter(edge, np.float32(0))
    return f


@njit(inline="always")
def _sample_pair(a1, a2, grid_h, grid_w, grid_h2, grid_w2, stride, k, seed, buf, matches, xy2):
    n = _collect_valid(a1, a2, grid_h, grid_w, grid_h2, grid_w2, stride, buf)
    m00, m01, m02, m10, m11, m12 = _grid_map(a1, a2, stride)
    state = np.uint64(seed)
    take = min(k, n)
    for i in range(take):  # partial Fisher-Yates: uniform without replacement
        state, bits = splitmix64(state)
        j = i + int((bits >> np.uint64(11)) * _INV_2_53 * (n - i))
        tmp = buf[i]
        buf[i] = buf[j]
        buf[j] = tmp
        idx1 = buf[i]
        x1 = idx1 % grid_w + 0.5
        y1 = idx1 // grid_w + 0.5
        x2 = m00 * x1 + m01 * y1 + m02
        y2 = m10 * x1 + m11 * y1 + m12
        cx, cy = _cell(x2, grid_w2), _cell(y2, grid_h2)
        matches[i, 0] = idx1
        matches[i, 1] = cy * grid_w2 + cx
        xy2[i, 0] = _inside_cell(x2, cx)
        xy2[i, 1] = _inside_cell(y2, cy)
    for i in range(take, k):
        matches[i, 0] = -1
        matches[i, 1] = -1
        xy2[i, 0] = np.nan
        xy2[i, 1] = np.nan
    return n


# Batch loops, parallel over pairs for the trainer's process and serial for DataLoader workers (a forked
# worker must not use Numba's thread pool, and the workers are the parallelism there anyway).
@njit(parallel=True, cache=True)
def _flow_parallel(a1, a2, gh, gw, gh2, gw2, stride, out):
    for b in prange(a1.shape[0]):
        _flow_pair(a1[b], a2[b], gh, gw, gh2, gw2, stride, out[b])


@njit(cache=True)
def _flow_serial(a1, a2, gh, gw, gh2, gw2, stride, out):
    for b in range(a1.shape[0]):
        _flow_pair(a1[b], a2[b], gh, gw, gh2, gw2, stride, out[b])


@njit(parallel=True, cache=True)
def _sample_parallel(a1, a2, gh, gw, gh2, gw2, stride, k, seeds, scratch, matches, xy2, n_valid):
    for b in prange(a1.shape[0]):
        n_valid[b] = _sample_pair(a1[b], a2[b], gh, gw, gh2, gw2, stride, k, seeds[b], scratch[b], matches[b],
                                  xy2[b])


@njit(cache=True)
def _sample_serial(a1, a2, gh, gw, gh2, gw2, stride, k, seeds, scratch, matches, xy2, n_valid):
    for b in range(a1.shape[0]):
        n_valid[b] = _sample_pair(a1[b], a2[b], gh, gw, gh2, gw2, stride, k, seeds[b], scratch[b], matches[b],
                                  xy2[b])


_FLOW = {True: _flow_parallel, False: _flow_serial}
_SAMPLE = {True: _sample_parallel, False: _sample_serial}


def _check_batch(a1: np.ndarray, a2: np.ndarray, view_hw, stride: int, view_hw2=None):
    a1 = np.ascontiguousarray(a1, dtype=np.float64)
    a2 = np.ascontiguousarray(a2, dtype=np.float64)
    if a1.ndim == 2:
        a1, a2 = a1[None], a2[None]
    if a1.shape != a2.shape or a1.shape[1:] != (2, 3):
        raise ValueError(f"expected two [B,2,3] affine batches, got {a1.shape} and {a2.shape}")
    for h, w in (view_hw, view_hw2 or view_hw):
        if h % stride or w % stride:
            raise ValueError(f"view size {(h, w)} is not a multiple of the feature stride {stride}")
    det = a1[:, 0, 0] * a1[:, 1, 1] - a1[:, 0, 1] * a1[:, 1, 0]
    if not np.all(np.abs(det) > 1e-12):
        raise ValueError("view-1 affine is singular: a view must be an invertible map")
    (h, w), (h2, w2) = view_hw, view_hw2 or view_hw
    return a1, a2, h // stride, w // stride, h2 // stride, w2 // stride


def flow(a1, a2, view_hw=(224, 224), stride: int = 4, parallel: bool = True, view_hw2=None) -> np.ndarray:
    """Correspondence flow of a batch of view pairs (view 2 of size ``view_hw2`` when the sizes differ).

    Returns float32 ``[B, Gh, Gw, 2]``: for each view-1 grid cell centre, its continuous (x, y) position in
    view 2's grid, NaN where that point falls outside view 2.
    """
    a1, a2, gh, gw, gh2, gw2 = _check_batch(a1, a2, view_hw, stride, view_hw2)
    out = np.empty((a1.shape[0], gh, gw, 2), np.float32)
    _FLOW[parallel](a1, a2, gh, gw, gh2, gw2, float(stride), out)
    return out


def sample_matches(a1, a2, seeds, num_matches: int = 32, view_hw=(224, 224), stride: int = 4,
                   parallel: bool = True, view_hw2=None):
    """Sample ``num_matches`` corresponding grid cells per view pair, uniformly without replacement (view 2 of
    size ``view_hw2`` when the sizes differ).

    Returns ``(matches, match_xy2, num_valid)``: int64 ``[B,K,2]`` flat row-major grid indices (view 1, view 2),
    float32 ``[B,K,2]`` continuous view-2 grid positions, and int64 ``[B]`` valid cells per pair.
    Raises ValueError when a pair has fewer than ``num_matches`` valid cells: the view sampler must guarantee
    the overlap (``min_matches >= num_matches``), so this is a contract violation, never padded silently.
    """
    a1, a2, gh, gw, gh2, gw2 = _check_batch(a1, a2, view_hw, stride, view_hw2)
    seeds = np.ascontiguousarray(seeds, dtype=np.uint64).reshape(-1)
    bsz = a1.shape[0]
    if seeds.shape[0] != bsz:
        raise ValueError(f"need one seed per pair: {seeds.shape[0]} seeds for {bsz} pairs")
    if not 0 < num_matches <= gh * gw:
        raise ValueError(f"num_matches={num_matches} must be in 1..{gh * gw} for a {gh}x{gw} grid")
    scratch = np.empty((bsz, gh * gw), np.int32)
    matches = np.empty((bsz, num_matches, 2), np.int64)
    xy2 = np.empty((bsz, num_matches, 2), np.float32)
    n_valid = np.empty(bsz, np.int64)
    _SAMPLE[parallel](a1, a2, gh, gw, gh2, gw2, float(stride), num_matches, seeds, scratch, matches, xy2, n_valid)
    short = np.flatnonzero(n_valid < num_matches)
    if short.size:
        raise ValueError(f"view pairs {short.tolist()} share only {n_valid[short].tolist()} grid cells, "
                         f"fewer than num_matches={num_matches}; sample views with min_matches >= num_matches")
    return matches, xy2, n_valid


def set_threads(n: int) -> None:
    """Threads used by the parallel kernels (Numba's pool)."""
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
