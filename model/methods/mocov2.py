"""MoCo v2 (Chen et al., 2020), the instance-level baseline: view 1's globally pooled, projected query against
view 2's key, with a queue of global keys as negatives (InfoNCE, T=0.2). With multi-crop views (reviewer R3's
control: an instance-level method fed the same crops as VADeR) every constrained pair of views is one such
query and key, the key from the pair's global view."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ..losses import info_nce
from ..network import GlobalHead
from .base import Method, MethodConfig


@dataclass(frozen=True)
class MoCoV2Config(MethodConfig):
    name: str = "mocov2"


def global_loss(q: dict, k: dict, queue, temperature: float):
    """InfoNCE of the normalised ``global`` outputs; returns (loss, keys to enqueue)."""
    qg, kg = F.normalize(q["global"], dim=1), F.normalize(k["global"], dim=1)
    return info_nce(qg, kg, queue, temperature), kg


class MoCoV2(Method):
    Config = MoCoV2Config
    queues = ("queue_global",)

    def heads(self, channels, dim):
        return {"global_head": GlobalHead(channels[-1], channels[-1], dim)}

    def loss(self, queries, keys, queues, pairs, step):
        """The mean over the matched pairs ``(i, j)`` of view ``i``'s query against view ``j``'s key."""
        losses, new = zip(*(global_loss(queries[i], keys[j], queues["queue_global"], self.cfg.temperature)
                            for i, j in pairs))
        return torch.stack(losses).mean(), {}, {"queue_global": torch.cat(new)}
