"""Metrics of the downstream protocols, each checked by hand-computed cases in tests/test_evaluation.py."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

IGNORE = 255


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[num_classes, num_classes]`` counts (rows: truth); pixels labelled ``IGNORE`` are left out."""
    keep = target != IGNORE
    idx = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes ** 2).view(num_classes, num_classes)


def iou_per_class(conf: torch.Tensor) -> torch.Tensor:
    """IoU of each class; NaN for classes in neither truth nor prediction (left out of the mean)."""
    tp = conf.diag().double()
    union = conf.sum(0).double() + conf.sum(1).double() - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def mean_iou(conf: torch.Tensor) -> float:
    return float(np.nanmean(iou_per_class(conf).numpy()))


DEPTH_METRICS = ("AbsRel", "SqRel", "RMSE", "RMSE log", "delta1", "delta2", "delta3")


def eigen_crop(shape: tuple[int, int]) -> torch.Tensor:
    """The Eigen et al. evaluation crop of NYU-depth v2 (rows 45..470, columns 41..600 of 480x640), scaled to
    ``shape`` when the depth map has another size."""
    h, w = shape
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[round(45 * h / 480):round(471 * h / 480), round(41 * w / 640):round(601 * w / 640)] = True
    return mask


def depth_errors(pred: torch.Tensor, target: torch.Tensor, depth_range=(1e-3, 10.0),
                 crop: torch.Tensor | None = None) -> dict[str, float]:
    """The standard depth metrics of one image, as the field computes them (Eigen et al.; BTS, monodepth2):
    pixels whose true depth lies strictly inside ``depth_range`` (and inside ``crop``) count; predictions are
    clamped to the range first. Average the per-image results over images (``mean_errors``)."""
    lo, hi = depth_range
    valid = (target > lo) & (target < hi)
    if crop is not None:
        valid &= crop
    if not valid.any():
        raise ValueError("a depth map has no valid pixel inside the depth range")
    p, t = pred[valid].double().clamp(lo, hi), target[valid].double()
    ratio = torch.maximum(p / t, t / p)
    return {"AbsRel": float(((p - t).abs() / t).mean()), "SqRel": float(((p - t) ** 2 / t).mean()),
            "RMSE": float(((p - t) ** 2).mean().sqrt()), "RMSE log": float(((p.log() - t.log()) ** 2).mean().sqrt()),
            **{f"delta{k}": float((ratio < 1.25 ** k).double().mean()) for k in (1, 2, 3)}}


def mean_errors(per_image: list[dict[str, float]]) -> dict[str, float]:
    """Each metric averaged over images (every image weighs the same, whatever its count of valid pixels)."""
    return {k: float(np.mean([e[k] for e in per_image])) for k in per_image[0]}


def jaccard(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """Region similarity J (IoU) of two boolean masks; 1 when both are empty (DAVIS convention)."""
    union = (pred | truth).sum()
    return 1.0 if union == 0 else float((pred & truth).sum() / union)


def boundary_map(mask: torch.Tensor) -> torch.Tensor:
    """One-pixel boundaries of a boolean mask, as DAVIS defines them: a pixel that differs from its east, south
    or south-east neighbour (outside the image counts as background); the last row compares east only, the
    last column south only, and the bottom-right pixel is never a boundary."""
    m = mask.bool()
    pad = F.pad(m[None].to(torch.uint8), (0, 1, 0, 1))[0].bool()  # a row and a column of background
    east, south, southeast = pad[:-1, 1:], pad[1:, :-1], pad[1:, 1:]
    b = (m ^ east) | (m ^ south) | (m ^ southeast)
    b[-1, :] = m[-1, :] ^ east[-1, :]
    b[:, -1] = m[:, -1] ^ south[:, -1]
    b[-1, -1] = False
    return b


def dilate_disk(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Boolean dilation by the disk of integer ``radius`` (offsets with dx^2 + dy^2 <= radius^2), exactly, as one
    horizontal max-pool per row offset."""
    h, w = mask.shape
    x = mask[None, None].float()
    out = torch.zeros_like(mask, dtype=torch.bool)
    for dy in range(-radius, radius + 1):
        half = math.isqrt(radius * radius - dy * dy)
        row = F.max_pool2d(x, (1, 2 * half + 1), stride=1, padding=(0, half))[0, 0] > 0
        if dy >= 0:
            out[: h - dy] |= row[dy:]
        else:
            out[-dy:] |= row[: h + dy]
    return out


def boundary_radius(shape, tolerance: float = 0.008) -> int:
    """The match radius in pixels: ``tolerance`` x the image diagonal, rounded up (DAVIS), or ``tolerance``
    itself when it is a whole number of pixels."""
    if tolerance >= 1:
        if tolerance != int(tolerance):
            raise ValueError(f"a tolerance >= 1 is a radius in pixels and must be whole, got {tolerance}")
        return int(tolerance)
    return math.ceil(tolerance * math.hypot(*shape))


def boundary_f(pred: torch.Tensor, truth: torch.Tensor, tolerance: float = 0.008) -> float:
    """Contour accuracy F (DAVIS): precision and recall of boundary pixels (``boundary_map``), each matched
    within a disk of ``boundary_radius`` pixels of the other mask's boundary; 1 when both boundaries are
    empty, 0 when only one is."""
    bp, bt = boundary_map(pred), boundary_map(truth)
    if not bp.any() and not bt.any():
        return 1.0
    if not bp.any() or not bt.any():
        return 0.0
    r = boundary_radius(truth.shape, tolerance)
    precision = float((bp & dilate_disk(bt, r)).sum() / bp.sum())
    recall = float((bt & dilate_disk(bp, r)).sum() / bt.sum())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def davis_statistics(per_frame: list[float]) -> dict[str, float]:
    """A measure's mean, recall (fraction of frames above 0.5) and decay (mean of the first quarter of the
    frames minus mean of the last quarter; quarters as DAVIS cuts them, overlapping by one frame)."""
    v = np.asarray(per_frame, dtype=np.float64)
    edges = (np.round(np.linspace(1, len(v), 5) + 1e-10) - 1).astype(int)
    first, last = v[edges[0]:edges[1] + 1], v[edges[3]:edges[4] + 1]
    return {"mean": float(v.mean()), "recall": float((v > 0.5).mean()),
            "decay": float(first.mean() - last.mean())}
