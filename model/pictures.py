"""Features made visible: the picture that the trainer's TensorBoard log and evaluation's figures both show, so
it lives below both of them."""

from __future__ import annotations

import numpy as np
import torch


def pca_rgb(feats: torch.Tensor) -> np.ndarray:
    """``[N, C, h, w]`` features -> ``[N, h, w, 3]`` uint8: the first 3 principal components as colours."""
    n, c, h, w = feats.shape
    x = feats.permute(0, 2, 3, 1).reshape(-1, c).double()
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x[:: max(1, len(x) // 20000)], full_matrices=False)
    y = x @ v[:3].T
    lo, hi = y.quantile(0.01, 0), y.quantile(0.99, 0)
    y = ((y - lo) / (hi - lo)).clamp(0, 1)
    return (y.reshape(n, h, w, 3).numpy() * 255).astype(np.uint8)
