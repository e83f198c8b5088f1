"""The MoCo machinery shared by the three objectives: query and momentum key encoders, key queues, shuffle-BN.

| objective | positives | negatives | loss |
| --- | --- | --- | --- |
| ``vader`` | 32 matched pixels per pair (decoder, 1/4 scale) | queue of pixel keys | 10 x InfoNCE, T=0.07 |
| ``densecl`` | global view + argmax-similar backbone cells | global keys; pooled dense keys | (1-l)Lg + lLd, T=0.2 |
| ``mocov2`` | the other view, globally pooled | queue of global keys | InfoNCE, T=0.2 |

Under DDP every rank enqueues the same all-gathered keys, so queues and pointers stay identical by construction
(the module is wrapped with ``broadcast_buffers=False``: nothing to broadcast).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from .losses import densecl_dense_loss, info_nce, vader_loss
from .network import DenseNetwork

OBJECTIVES = ("vader", "densecl", "mocov2")
DEFAULT_TEMPERATURE = {"vader": 0.07, "densecl": 0.2, "mocov2": 0.2}


@dataclass(frozen=True)
class MoCoConfig:
    objective: str = "vader"
    arch: str = "resnet50"
    dim: int = 128
    queue_size: int = 65536
    momentum: float = 0.999
    temperature: float | None = None  # None: the objective's default
    loss_scale: float = 10.0  # VADeR multiplies its loss by 10
    symmetric: bool = False  # VADeR: also query from view 2
    densecl_lambda: float = 0.5
    shuffle_bn: bool = True  # off when the encoder uses SyncBatchNorm
    shuffle_groups: int = 2  # single process: key BN statistics over this many shuffled sub-batches


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def concat_all_gather(t: torch.Tensor) -> torch.Tensor:
    if _world() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(_world())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


class MoCo(nn.Module):
    def __init__(self, cfg: MoCoConfig):
        super().__init__()
        if cfg.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {cfg.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        self.cfg = cfg
        self.temperature = cfg.temperature or DEFAULT_TEMPERATURE[cfg.objective]
        self.encoder_q = DenseNetwork(cfg.arch, cfg.objective, cfg.dim)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        queues = ["queue_dense"] if cfg.objective in ("vader", "densecl") else []
        queues += ["queue_global"] if cfg.objective in ("mocov2", "densecl") else []
        for name in queues:
            self.register_buffer(name, F.normalize(torch.randn(cfg.dim, cfg.queue_size), dim=0))
            self.register_buffer(name + "_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self) -> None:
        m = self.cfg.momentum
        for q, k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            k.mul_(m).add_(q.detach(), alpha=1 - m)

    @torch.no_grad()
    def enqueue(self, name: str, keys: torch.Tensor) -> None:
        keys = concat_all_gather(keys.float())
        queue, ptr = getattr(self, name), getattr(self, name + "_ptr")
        n, size = keys.shape[0], queue.shape[1]
        if size % n:
            raise ValueError(f"{name}: queue size {size} is not a multiple of the {n} keys enqueued per step")
        start = int(ptr)
        queue[:, start:start + n] = keys.T
        ptr.fill_((start + n) % size)

    @torch.no_grad()
    def encode_keys(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Key encoder with shuffled BatchNorm statistics, so a query cannot find its key through BN."""
        if not self.cfg.shuffle_bn:
            return self.encoder_k(x)
        if _world() > 1:  # MoCo's batch shuffle across ranks
            full = concat_all_gather(x)
            perm = torch.randperm(full.shape[0], device=x.device)
            dist.broadcast(perm, src=0)
            rank = dist.get_rank()
            out = self.encoder_k(full[perm.view(_world(), -1)[rank]])
            inverse = torch.argsort(perm).view(_world(), -1)[rank]
            return {k: concat_all_gather(v)[inverse] for k, v in out.items()}
        perm = torch.randperm(x.shape[0], device=x.device)
        chunks = [self.encoder_k(c) for c in x[perm].chunk(self.cfg.shuffle_groups)]
        inverse = torch.argsort(perm)
        return {k: torch.cat([c[k] for c in chunks])[inverse] for k in chunks[0]}

    def forward(self, view1, view2, matches=None, match_xy2=None, densecl_lambda: float | None = None):
        """Returns (loss, stats dict). Views are augmented, normalised float tensors."""
        with torch.no_grad():
            self.momentum_update()
        obj, t = self.cfg.objective, self.temperature
        q = self.encoder_q(view1)
        k = self.encode_keys(view2)
        stats = {}
        if obj == "vader":
            loss, keys = vader_loss(q["dense"], k["dense"], matches, match_xy2, self.queue_dense.clone(), t,
                                    self.cfg.loss_scale)
            if self.cfg.symmetric:
                q2, k1 = self.encoder_q(view2), self.encode_keys(view1)
                loss2, keys2 = vader_loss(q2["dense"], k1["dense"], matches, match_xy2, self.queue_dense.clone(), t,
                                          self.cfg.loss_scale, reverse=True)
                loss, keys = (loss + loss2) / 2, torch.cat([keys, keys2])
            self.enqueue("queue_dense", keys)
        elif obj == "mocov2":
            qg, kg = F.normalize(q["global"], dim=1), F.normalize(k["global"], dim=1)
            loss = info_nce(qg, kg, self.queue_global.clone(), t)
            self.enqueue("queue_global", kg)
        else:  # densecl
            lam = self.cfg.densecl_lambda if densecl_lambda is None else densecl_lambda
            qg, kg = F.normalize(q["global"], dim=1), F.normalize(k["global"], dim=1)
            loss_g = info_nce(qg, kg, self.queue_global.clone(), t)
            loss_d = densecl_dense_loss(q["dense"].flatten(2), k["dense"].flatten(2), q["c5"].flatten(2),
                                        k["c5"].flatten(2), self.queue_dense.clone(), t)
            loss = (1 - lam) * loss_g + lam * loss_d
            stats = {"loss_global": loss_g.detach(), "loss_dense": loss_d.detach()}
            self.enqueue("queue_global", kg)
            self.enqueue("queue_dense", F.normalize(k["dense"].mean((2, 3)), dim=1))
        return loss, stats

