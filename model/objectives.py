"""The three objectives, each defined once: its heads, queues, keys per pair, default temperature, loss, and the
output evaluation reads as its dense features. The network, the MoCo wrapper, the trainer's configuration checks
and the evaluation's feature extractors all look an objective up here.

| objective | positives | negatives | loss |
| --- | --- | --- | --- |
| ``vader`` | 32 matched pixels per pair (decoder, 1/4 scale) | queue of pixel keys (or, ``negatives="image"``, the
  same image's other cells) | 10 x InfoNCE, T=0.07 |
| ``densecl`` | global view + argmax-similar backbone cells | global keys; pooled dense keys | (1-l)Lg + lLd, T=0.2 |
| ``mocov2`` | the other view, globally pooled | queue of global keys | InfoNCE, T=0.2 |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn import functional as F

from .losses import densecl_dense_loss, info_nce, vader_loss


def _vader(moco, view1, view2, matches, match_xy2, step):
    t, scale = moco.temperature, moco.cfg.loss_scale
    radius = moco.cfg.exclusion_radius if moco.cfg.negatives == "image" else None
    q, k = moco.encoder_q(view1), moco.encode_keys(view2)
    loss, keys = vader_loss(q["dense"], k["dense"], matches, match_xy2, moco.queue_dense, t, scale,
                            exclusion_radius=radius)
    if moco.cfg.symmetric:  # also query from view 2's points, keys at view 1's cells
        q2, k1 = moco.encoder_q(view2), moco.encode_keys(view1)
        loss2, keys2 = vader_loss(q2["dense"], k1["dense"], matches, match_xy2, moco.queue_dense, t, scale,
                                  reverse=True, exclusion_radius=radius)
        loss, keys = (loss + loss2) / 2, torch.cat([keys, keys2])
    return loss, {}, {"queue_dense": keys}


def _global_loss(moco, q, k):
    qg, kg = F.normalize(q["global"], dim=1), F.normalize(k["global"], dim=1)
    return info_nce(qg, kg, moco.queue_global, moco.temperature), kg


def _mocov2(moco, view1, view2, matches, match_xy2, step):
    loss, keys = _global_loss(moco, moco.encoder_q(view1), moco.encode_keys(view2))
    return loss, {}, {"queue_global": keys}


def _densecl(moco, view1, view2, matches, match_xy2, step):
    """lambda is 0 for the first ``densecl_warmup_steps`` steps, as in DenseCL; ``step=None``: always lambda."""
    cfg = moco.cfg
    lam = 0.0 if step is not None and step < cfg.densecl_warmup_steps else cfg.densecl_lambda
    q, k = moco.encoder_q(view1), moco.encode_keys(view2)
    loss_g, keys_g = _global_loss(moco, q, k)
    loss_d = densecl_dense_loss(q["dense"].flatten(2), k["dense"].flatten(2), q["c5"].flatten(2), k["c5"].flatten(2),
                                moco.queue_dense, moco.temperature)
    stats = {"loss_global": loss_g.detach(), "loss_dense": loss_d.detach()}
    keys = {"queue_global": keys_g, "queue_dense": F.normalize(k["dense"].mean((2, 3)), dim=1)}
    return (1 - lam) * loss_g + lam * loss_d, stats, keys


@dataclass(frozen=True)
class Objective:
    name: str
    heads: tuple[str, ...]  # what the network builds on the encoder: decoder, global_head, dense_head
    queues: tuple[str, ...]  # MoCo key queues (buffers of the same name)
    temperature: float  # default InfoNCE temperature
    dense_output: str | None  # the output evaluated as dense features; None: the encoder as a global model
    dense_stride: int | None  # stride of the output the matches index (None: matches are not used)
    # (moco, view1, view2, matches, match_xy2, step) -> (loss, stats, {queue: keys to enqueue})
    loss: Callable

    def keys_per_pair(self, num_matches: int, symmetric: bool) -> int:
        """Keys each pair adds to each of its queues per step."""
        return num_matches * (2 if symmetric else 1) if self.name == "vader" else 1


OBJECTIVES = {o.name: o for o in (
    Objective("vader", ("decoder",), ("queue_dense",), 0.07, "dense", 4, _vader),
    Objective("densecl", ("global_head", "dense_head"), ("queue_global", "queue_dense"), 0.2, "dense", None,
              _densecl),
    Objective("mocov2", ("global_head",), ("queue_global",), 0.2, None, None, _mocov2),
)}


def objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"objective={name!r}: choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]
