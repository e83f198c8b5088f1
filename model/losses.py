"""The pieces of contrastive losses that several methods share, as pure functions of embeddings (each method's
own loss lives in its module under ``methods``), so each can be checked against a slow reference."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE with one positive key per query and a queue of negatives.

    q, k: ``[N, D]`` L2-normalised; queue: ``[D, Q]`` L2-normalised keys. Returns the mean loss.
    """
    pos = (q * k).sum(1, keepdim=True)
    neg = q @ queue
    logits = torch.cat([pos, neg], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def gather_cells(emb: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Embeddings ``[B, C, H, W]`` at flat grid indices ``[B, K]`` -> ``[B, K, C]``."""
    flat = emb.flatten(2)
    return flat.gather(2, index[:, None, :].expand(-1, flat.shape[1], -1)).transpose(1, 2)


def sample_bilinear(emb: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Embeddings ``[B, C, H, W]`` at continuous grid positions ``[B, K, 2]`` (cell centres at +0.5)."""
    h, w = emb.shape[-2:]
    grid = 2 * xy / xy.new_tensor([w, h]) - 1  # align_corners=False maps -1/1 to the outer cell edges
    out = F.grid_sample(emb, grid[:, :, None, :].to(emb.dtype), mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out[..., 0].transpose(1, 2)
