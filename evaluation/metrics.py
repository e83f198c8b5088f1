"""Metrics of the downstream protocols, each checked by hand-computed cases in tests/test_evaluation.py."""

from __future__ import annotations

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


def depth_errors(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """RMSE (metres), mean absolute relative error and the delta < 1.25 accuracy over valid (> 0) pixels."""
    valid = target > 0
    p, t = pred[valid].double(), target[valid].double()
    ratio = torch.maximum(p / t, t / p.clamp(min=1e-6))
    return {"RMSE": float(((p - t) ** 2).mean().sqrt()), "AbsRel": float(((p - t).abs() / t).mean()),
            "delta1": float((ratio < 1.25).double().mean())}


def jaccard(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """Region similarity J (IoU) of two boolean masks; 1 when both are empty (DAVIS convention)."""
    union = (pred | truth).sum()
    return 1.0 if union == 0 else float((pred & truth).sum() / union)


def _boundary(mask: torch.Tensor) -> torch.Tensor:
    m = mask[None, None].float()
    eroded = -F.max_pool2d(-m, 3, stride=1, padding=1)
    return (m - eroded)[0, 0] > 0


def boundary_f(pred: torch.Tensor, truth: torch.Tensor, tolerance: float = 0.008) -> float:
    """Contour accuracy F (DAVIS): boundary precision/recall with a match radius of ``tolerance`` x the image
    diagonal; 1 when both boundaries are empty, 0 when only one is."""
    bp, bt = _boundary(pred), _boundary(truth)
    if not bp.any() and not bt.any():
        return 1.0
    if not bp.any() or not bt.any():
        return 0.0
    r = max(1, round(tolerance * float(np.hypot(*truth.shape))))

    def dilate(b):
        return F.max_pool2d(b[None, None].float(), 2 * r + 1, stride=1, padding=r)[0, 0] > 0

    precision = float((bp & dilate(bt)).sum() / bp.sum())
    recall = float((bt & dilate(bp)).sum() / bt.sum())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
