"""The deleted pair sampler's output format, for the tests that froze it (``frozen/pair_sampler.npz``) and those
written against it: drawn now by the view engine."""

import numpy as np

from densessl.pipeline import PairSpec
from densessl.pipeline.geometry import view_params


def pair_row(spec: PairSpec, seed: int, height: int, width: int) -> np.ndarray:
    """int64[12] as ``geometry.view_pair_params`` returned them for one ``height`` x ``width`` image: top, left,
    height, width, flip of views 1 and 2, the draws needed (0: fell back) and the match seed (uint64 bits as
    int64), from ``spec.view_spec``'s windows and first pair seed."""
    windows, seeds = view_params(seed, height, width, spec.view_spec)
    return np.array([*windows[0, :5], *windows[1, :5], windows[0, 5], seeds[0].view(np.int64)], np.int64)
