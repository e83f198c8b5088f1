"""VADeR (Pinheiro et al., NeurIPS 2020): pixel-level contrast between matched pixels of two views.

The query is view 1's FPN embedding (stride 4) at each matched cell; the positive key is view 2's key-network
embedding bilinearly sampled at the exact corresponding point; negatives are a queue of pixel keys, or, with
``negatives="image"``, the other cells of the same key map, or, with ``negatives="batch"``, the step's other
positive keys (SimCLR-style; with ``momentum=0`` there is no momentum encoder either). ``positives="unmatched"``
is the paper's Table 3 control: queries at random cells of view 1, keys still at the matched points. Loss:
``loss_scale`` x InfoNCE at T=0.07.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ..losses import gather_cells, info_nce, sample_bilinear
from ..network import FPNDecoder
from .base import Method, MethodConfig


@dataclass(frozen=True)
class VaderConfig(MethodConfig):
    name: str = "vader"
    temperature: float = 0.07
    loss_scale: float = 10.0  # the paper multiplies its loss by 10
    symmetric: bool = False  # also query from view 2's points, keys at view 1's cells
    negatives: str = "queue"  # 'queue' of pixel keys; 'image': the same image's other cells; 'batch': the step's
    # other positive keys (the queue is neither read nor filled)
    exclusion_radius: float = 2.0  # negatives='image': cells this near the positive are not negatives
    positives: str = "matched"  # 'unmatched': queries at random cells of view 1 (Table 3's control)

    def __post_init__(self):
        super().__post_init__()
        if not self.loss_scale > 0:
            raise ValueError(f"loss_scale={self.loss_scale} must be > 0")
        if self.negatives not in ("queue", "image", "batch"):
            raise ValueError(f"negatives={self.negatives!r}: choose queue, image or batch")
        if self.positives not in ("matched", "unmatched"):
            raise ValueError(f"positives={self.positives!r}: choose matched or unmatched")
        if self.exclusion_radius < 0:
            raise ValueError(f"exclusion_radius={self.exclusion_radius} must be >= 0 (cells)")


class Vader(Method):
    Config = VaderConfig
    queues = ("queue_dense",)
    dense_output = "dense"
    dense_stride = 4

    def heads(self, channels, dim):
        return {"decoder": FPNDecoder(channels, dim=dim)}

    def pairs_only(self) -> str | None:
        return "method.symmetric=true: each pair is also read from view 2's side" if self.cfg.symmetric else None

    def keys_per_pair(self, num_matches: int) -> int:
        return num_matches * (2 if self.cfg.symmetric else 1)

    def encodes(self, pairs):
        """Symmetric: each pair both ways, queries (i, j) and keys (j, i)."""
        if not self.cfg.symmetric:
            return super().encodes(pairs)
        (i, j), = pairs
        return [i, j], [j, i]

    def _negatives(self, queue: torch.Tensor):
        """``vader_loss``'s queue (``None``: in-batch negatives) and exclusion radius, per ``negatives``."""
        cfg = self.cfg
        return (None if cfg.negatives == "batch" else queue), (cfg.exclusion_radius if cfg.negatives == "image"
                                                                 else None)

    def _queries_at(self, matches: torch.Tensor, q_emb: torch.Tensor) -> torch.Tensor:
        """The matched cells of view 1, or with ``positives="unmatched"`` random cells (torch's global RNG, which
        checkpoints keep; with ``symmetric`` the view-1 end of the reversed direction is random too)."""
        if self.cfg.positives == "matched":
            return matches
        cells = torch.randint(0, q_emb.shape[-2] * q_emb.shape[-1], matches.shape[:-1], device=matches.device)
        return torch.cat([cells[..., None], matches[..., 1:]], -1)

    def _enqueued(self, new: torch.Tensor) -> dict:
        return {} if self.cfg.negatives == "batch" else {"queue_dense": new}

    def loss(self, queries, keys, queues, pairs, step):
        """The mean of every matched pair's loss: view i's own embedding queries at its matched cells; the keys are
        view j's, sampled at the exact corresponding points (symmetric: also view j's points query, keys at view
        i's cells)."""
        cfg = self.cfg
        queue, radius = self._negatives(queues["queue_dense"])
        losses, new = [], []
        for (i, j), (matches, match_xy) in pairs.items():
            loss, k = vader_loss(queries[i]["dense"], keys[j]["dense"], self._queries_at(matches, queries[i]["dense"]),
                                 match_xy, queue, cfg.temperature, cfg.loss_scale, exclusion_radius=radius)
            losses.append(loss)
            new.append(k)
            if cfg.symmetric:
                loss, k = vader_loss(queries[j]["dense"], keys[i]["dense"], self._queries_at(matches, keys[i]["dense"]),
                                     match_xy, queue, cfg.temperature, cfg.loss_scale, reverse=True,
                                     exclusion_radius=radius)
                losses.append(loss)
                new.append(k)
        return torch.stack(losses).mean(), {}, self._enqueued(torch.cat(new))


def vader_loss(q_emb, k_emb, matches, match_xy2, queue, temperature: float = 0.07, scale: float = 10.0,
               reverse: bool = False, exclusion_radius: float | None = None):
    """Pixel InfoNCE: the query is view 1's embedding at each matched cell, the positive key view 2's
    embedding bilinearly sampled at the exact corresponding point, negatives a queue of pixel keys.
    ``reverse=True`` (symmetric VADeR) queries from view 2's point and takes the key at view 1's cell.
    ``exclusion_radius`` (cells; the reviewers' ablation): negatives are instead every cell of the same key
    map farther than that from the positive's position, and the queue is not read. ``queue=None``: in-batch
    negatives, every other query's positive key of the step.

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
    if queue is None:
        logits = q @ k.T / temperature  # the positive on the diagonal
        return scale * F.cross_entropy(logits, torch.arange(len(q), device=q.device)), k
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
