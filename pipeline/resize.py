"""The antialiased bilinear resize of a crop window, as a Numba kernel: every CPU backend's view cutter
(reference loader, FFCV decoder, DALI CPU graph), callable from Python and from compiled pipelines.

It computes torch's ``interpolate(mode="bilinear", antialias=True)`` (the filter torchvision's
RandomResizedCrop uses) to within one grey level, and one kernel means every backend cuts the same views from
the same windows.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def _aa_weights(in_size, out_size):
    """Antialiased bilinear (triangle) taps per output pixel, as torch's ``antialias=True`` and PIL compute them
    (half-pixel centres, support widened by the downscale factor): first tap index, tap count, weights."""
    scale = in_size / out_size
    support = max(scale, 1.0)
    width = int(np.ceil(support)) * 2 + 1
    first = np.empty(out_size, np.int64)
    count = np.empty(out_size, np.int64)
    weights = np.zeros((out_size, width), np.float32)
    for i in range(out_size):
        centre = (i + 0.5) * scale
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), in_size)
        total = 0.0
        for j in range(hi - lo):
            w = max(0.0, 1.0 - abs((j + lo - centre + 0.5) / support))
            weights[i, j] = w
            total += w
        for j in range(hi - lo):
            weights[i, j] /= total
        first[i], count[i] = lo, hi - lo
    return first, count, weights


@njit(cache=True, fastmath=True)
def resize_crop_aa(image, top, left, height, width, flip, out):
    """Resize ``image[top:top+height, left:left+width]`` (HxWx3 uint8) into ``out`` (hxwx3 uint8), mirrored
    when ``flip``.

    Both passes run over contiguous memory so that they vectorise: the vertical pass over whole source rows,
    stored transposed (one row per source column), then the horizontal pass over those rows; a gathering
    horizontal pass does not vectorise (rates against it and torch's SIMD path: benchmarks/RESULTS.md).
    """
    oh, ow = out.shape[0], out.shape[1]
    xf, xn, xw = _aa_weights(width, ow)
    yf, yn, yw = _aa_weights(height, oh)
    row = np.empty(width * 3, np.float32)
    columns = np.empty((width, oh * 3), np.float32)
    for r in range(oh):
        row[:] = 0.0
        for j in range(yn[r]):
            w = yw[r, j]
            src = image[top + yf[r] + j, left:left + width].reshape(-1)
            for k in range(width * 3):
                row[k] += w * np.float32(src[k])
        for x in range(width):
            columns[x, 3 * r] = row[3 * x]
            columns[x, 3 * r + 1] = row[3 * x + 1]
            columns[x, 3 * r + 2] = row[3 * x + 2]
    acc = np.empty(oh * 3, np.float32)
    column = np.empty(oh * 3, np.uint8)
    for c in range(ow):
        acc[:] = 0.5  # rounds to nearest in the truncating conversion below (every tap is non-negative)
        for j in range(xn[c]):
            w = xw[c, j]
            src_col = columns[xf[c] + j]
            for k in range(oh * 3):
                acc[k] += w * src_col[k]
        for k in range(oh * 3):  # float -> int32 -> uint8 vectorises; float -> uint8 does not
            column[k] = np.uint8(min(255, max(0, np.int32(acc[k]))))
        d = ow - 1 - c if flip else c
        for r in range(oh):
            out[r, d, 0] = column[3 * r]
            out[r, d, 1] = column[3 * r + 1]
            out[r, d, 2] = column[3 * r + 2]


@njit(cache=True)
def cut_views(image, windows, sizes, offsets, row):
    """Every view of one decoded image into ``row`` (every view end to end, ``ViewSpec.offsets``), from the
    sampler's windows (``geometry.draw_views``: ``[V, >=5]`` top, left, height, width, flip, in the image's own
    coordinates) and the views' ``sizes``: the one view cutter of the reference loader, FFCV's decoder and
    DALI's CPU graph."""
    for v in range(sizes.shape[0]):
        view = row[offsets[v]:offsets[v + 1]].reshape(sizes[v, 0], sizes[v, 1], 3)
        resize_crop_aa(image, windows[v, 0], windows[v, 1], windows[v, 2], windows[v, 3], windows[v, 4] != 0, view)
