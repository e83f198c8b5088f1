"""Contrastive losses as pure functions of embeddings, so each can be checked against a slow reference."""

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


def vader_loss(q_emb, k_emb, matches, match_xy2, queue, temperature: float = 0.07, scale: float = 10.0,
               reverse: bool = False, exclusion_radius: float | None = None):
    """Pixel InfoNCE: the query is view 1's embedding at each matched cell, the positive key view 2's
    embedding bilinearly sampled at the exact corresponding point, negatives a queue of pixel keys.
    ``reverse=True`` (symmetric VADeR) queries from view 2's point and takes the key at view 1's cell.
    ``exclusion_radius`` (cells; the reviewers' ablation): negatives are instead every cell of the same key
    map farther than that from the positive's position, and the queue is not read.

    Returns (loss, keys ``[B*K, D]`` to enqueue).
    """
    at_cells = gather_cells(k_emb if reverse else q_emb, matches[..., 0])
    at_points = sample_bilinear(q_emb if reverse else k_emb, match_xy2)
    q, k = (at_points, at_cells) if reverse else (at_cells, at_points)
    if exclusion_radius is not None:
        w = k_emb.shape[-1]
        cell = matches[..., 0]
        centres = torch.stack([cell % w, torch.div(cell, w, rounding_mode="floor")], -1).to(match_xy2.dtype) + 0.5
        loss = same_image_nce(F.normalize(q, dim=2), F.normalize(k, dim=2), F.normalize(k_emb, dim=1),
                              centres if reverse else match_xy2, exclusion_radius, temperature)
        return scale * loss, F.normalize(k.flatten(0, 1), dim=1)
    q, k = F.normalize(q.flatten(0, 1), dim=1), F.normalize(k.flatten(0, 1), dim=1)
    return scale * info_nce(q, k, queue, temperature), k


def same_image_nce(q, k, key_map, key_xy, radius: float, temperature: float) -> torch.Tensor:
    """InfoNCE whose negatives are the other cells of the same image's key map.

    q, k: ``[B, K, D]`` normalised queries and positive keys; key_map: ``[B, D, H, W]`` normalised; key_xy:
    ``[B, K, 2]`` the positive's position on that grid (cell centres at +0.5). Cells whose centre lies within
    ``radius`` cells of it are not negatives (they are nearly the positive itself)."""
    b, d, h, w = key_map.shape
    pos = (q * k).sum(2, keepdim=True)  # [B, K, 1]
    neg = q @ key_map.flatten(2)  # [B, K, H*W]
    ys, xs = torch.meshgrid(torch.arange(h, device=q.device), torch.arange(w, device=q.device), indexing="ij")
    centres = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1).to(key_xy.dtype) + 0.5  # [H*W, 2]
    near = (key_xy[:, :, None, :] - centres).square().sum(-1) <= radius ** 2
    logits = torch.cat([pos, neg.masked_fill(near, float("-inf"))], 2).flatten(0, 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=q.device))


def densecl_dense_loss(q_dense, k_dense, q_feat, k_feat, queue, temperature: float = 0.2):
    """DenseCL's dense term: each query location's positive is the key location whose backbone feature is most
    cosine-similar; negatives are a queue of pooled dense keys.

    q_dense, k_dense: ``[B, D, S]`` projected (normalised here); q_feat, k_feat: ``[B, C, S]`` backbone features.
    """
    qd, kd = F.normalize(q_dense, dim=1), F.normalize(k_dense, dim=1)
    sim = F.normalize(q_feat, dim=1).transpose(1, 2) @ F.normalize(k_feat, dim=1)  # [B, S, S]
    best = sim.argmax(2)  # [B, S] key location for each query location
    k_pos = kd.gather(2, best[:, None, :].expand(-1, kd.shape[1], -1))
    q = qd.transpose(1, 2).flatten(0, 1)
    k = k_pos.transpose(1, 2).flatten(0, 1)
    return info_nce(q, k, queue, temperature)
