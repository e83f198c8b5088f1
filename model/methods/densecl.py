"""DenseCL (Wang et al., CVPR 2021): MoCo v2's global loss plus a dense term in which each query cell's positive
is the key cell whose backbone feature is most similar; pooled dense keys form a second queue. The loss is
``(1 - dense_weight) Lg + dense_weight Ld``, with ``dense_weight`` 0 for the first ``warmup_steps`` steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch.nn import functional as F

from ..losses import info_nce
from ..network import DenseHead, GlobalHead
from .base import Method, MethodConfig
from .mocov2 import global_loss


@dataclass(frozen=True)
class DenseCLConfig(MethodConfig):
    name: str = "densecl"
    dense_weight: float = 0.5  # lambda: the dense term's share of the loss
    warmup_steps: int = 1000  # the dense term's weight is 0 before this step, as in DenseCL

    legacy: ClassVar[dict[str, str]] = {**MethodConfig.legacy, "densecl_lambda": "dense_weight",
                                        "densecl_warmup_steps": "warmup_steps"}

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.dense_weight <= 1:
            raise ValueError(f"dense_weight={self.dense_weight} must be in [0, 1]")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0")


class DenseCL(Method):
    Config = DenseCLConfig
    queues = ("queue_global", "queue_dense")
    dense_output = "dense"

    def heads(self, channels, dim):
        c5 = channels[-1]
        return {"global_head": GlobalHead(c5, c5, dim), "dense_head": DenseHead(c5, c5, dim)}

    def pairs_only(self) -> str | None:
        return "its dense term matches every query cell against one key view's cells"

    def loss(self, queries, keys, queues, pairs, step):
        """``step=None`` (outside training): the full dense weight."""
        (i, j), = pairs
        cfg, q, k = self.cfg, queries[i], keys[j]
        lam = 0.0 if step is not None and step < cfg.warmup_steps else cfg.dense_weight
        loss_g, keys_g = global_loss(q, k, queues["queue_global"], cfg.temperature)
        loss_d = densecl_dense_loss(q["dense"].flatten(2), k["dense"].flatten(2), q["c5"].flatten(2),
                                    k["c5"].flatten(2), queues["queue_dense"], cfg.temperature)
        stats = {"loss_global": loss_g.detach(), "loss_dense": loss_d.detach()}
        new = {"queue_global": keys_g, "queue_dense": F.normalize(k["dense"].mean((2, 3)), dim=1)}
        return (1 - lam) * loss_g + lam * loss_d, stats, new


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
