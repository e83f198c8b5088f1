"""Geometry checks shared by every loader backend's tests.

A ramp image's pixels name their own source position (R encodes x, G encodes y). Decoding the views at every
match must give back the source point that the returned geometry predicts, in both views. ``crop_from_affine``
recovers the crop window a view matrix came from, to re-cut a view and compare.
"""

import numpy as np
import torch

from densessl.pipeline import Crop, invert_affine
from geometry_reference import apply_affine


def crop_from_affine(a: np.ndarray, size) -> Crop:
    """Invert ``crop_affine``: the integer window and flip a view matrix came from."""
    flip = a[0, 0] < 0
    sx, sy = abs(a[0, 0]), a[1, 1]
    left = (a[0, 2] - size[1]) / sx if flip else -a[0, 2] / sx
    return Crop(round(-a[1, 2] / sy), round(left), round(size[0] / sy), round(size[1] / sx), bool(flip))


def bilinear(image_hwc: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Sample an HxWxC image at continuous (x, y) points (pixel centres at +0.5)."""
    h, w = image_hwc.shape[:2]
    x = np.clip(xy[:, 0] - 0.5, 0, w - 1)
    y = np.clip(xy[:, 1] - 0.5, 0, h - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    img = image_hwc.astype(np.float64)
    top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
    bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def ramp_source_coords(view_chw: torch.Tensor, xy: np.ndarray, source_hw) -> np.ndarray:
    rgb = bilinear(view_chw.permute(1, 2, 0).cpu().numpy(), xy)
    return np.stack([rgb[:, 0] / 255 * source_hw[1], rgb[:, 1] / 255 * source_hw[0]], -1)


def ramp_errors(batches, files, stride=4, mirror=False, stored=None):
    """Source-pixel errors (x, y) at every match: decoded view 1 vs its geometry, and view 1 vs view 2.

    ``mirror=True`` predicts with a horizontally mirrored view-1 geometry, a control the check must reject.
    ``stored`` (dataset index -> HxWx3 image) compares against a loader's own stored copy of each source, read at
    the predicted point, instead of the ideal ramp: a re-encoding store (FFCV's JPEG) shifts colours, not geometry.
    """
    from PIL import Image
    geometry_err, pair_err = [], []
    for batch in batches:
        for b in range(batch["index"].shape[0]):
            with Image.open(files[int(batch["index"][b])]) as im:
                src_hw = (im.height, im.width)
            g1 = batch["geometry1"][b].double().numpy()
            m = batch["matches"][b].numpy()
            gw = batch["view1"].shape[-1] // stride
            p1 = (np.stack([m[:, 0] % gw, m[:, 0] // gw], -1) + 0.5) * stride
            p2 = batch["match_xy2"][b].double().numpy() * stride
            s1 = ramp_source_coords(batch["view1"][b], p1, src_hw)
            s2 = ramp_source_coords(batch["view2"][b], p2, src_hw)
            predicted = apply_affine(invert_affine(g1), p1)
            if mirror:
                predicted[:, 0] = src_hw[1] - predicted[:, 0]
            if stored is not None:
                source = torch.from_numpy(stored[int(batch["index"][b])]).permute(2, 0, 1)
                predicted = ramp_source_coords(source, predicted, src_hw)
            geometry_err.append(s1 - predicted)
            pair_err.append(s1 - s2)
    return np.concatenate(geometry_err), np.concatenate(pair_err)


def assert_ramp_agrees(err):
    """Measured on the reference loader: |err| median 0.2 px, 99th percentile 1 px, bias 0.02 px."""
    assert np.abs(err).max() < 2.5, f"worst error {np.abs(err).max():.2f} source px"
    assert np.abs(err).mean() < 0.4, f"mean error {np.abs(err).mean():.2f} source px"
    assert np.abs(err.mean(0)).max() < 0.2, f"bias {err.mean(0)} source px"
