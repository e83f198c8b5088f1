"""The MoCo machinery shared by the three objectives: query and momentum key encoders, key queues, shuffle-BN.
What differs between objectives (heads, queues, loss) is defined in ``objectives.py``.

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

from .network import DenseNetwork
from .objectives import objective


@dataclass(frozen=True)
class MoCoConfig:
    """Everything that defines the model; saved in every checkpoint (``model_config``) and rebuilt from it."""

    objective: str = "vader"
    arch: str = "resnet50"
    dim: int = 128
    queue_size: int = 65536
    momentum: float = 0.999
    temperature: float | None = None  # None: the objective's default
    loss_scale: float = 10.0  # VADeR multiplies its loss by 10
    symmetric: bool = False  # VADeR: also query from view 2
    negatives: str = "queue"  # VADeR: 'queue' of pixel keys, or 'image': the same image's other cells
    exclusion_radius: float = 2.0  # negatives='image': cells this near the positive are not negatives
    densecl_lambda: float = 0.5
    densecl_warmup_steps: int = 1000  # DenseCL: lambda is 0 before this step
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
        if cfg.negatives not in ("queue", "image") or (cfg.negatives == "image" and cfg.objective != "vader"):
            raise ValueError(f"negatives={cfg.negatives!r}: 'queue', or 'image' (objective=vader only)")
        if not 0 <= cfg.momentum < 1:
            raise ValueError(f"momentum={cfg.momentum}: must be in [0, 1) (0: keys from the query encoder's "
                             "weights under stop-gradient)")
        self.cfg = cfg
        self.objective = objective(cfg.objective)
        self.temperature = cfg.temperature or self.objective.temperature
        self.encoder_q = DenseNetwork(cfg.arch, cfg.objective, cfg.dim)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        for name in self.objective.queues:
            self.register_buffer(name, F.normalize(torch.randn(cfg.dim, cfg.queue_size), dim=0))
            self.register_buffer(name + "_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self) -> None:
        """k = m k + (1 - m) q over all parameters, as two multi-tensor kernels rather than two per tensor (the
        same arithmetic, in the same order, as the per-tensor loop)."""
        m = self.cfg.momentum
        keys, queries = list(self.encoder_k.parameters()), [q.detach() for q in self.encoder_q.parameters()]
        torch._foreach_mul_(keys, m)
        torch._foreach_add_(keys, queries, alpha=1 - m)

    @torch.no_grad()
    def enqueue(self, name: str, keys: torch.Tensor) -> None:
        keys = concat_all_gather(keys.float())
        queue, ptr = getattr(self, name), getattr(self, name + "_ptr")
        n, size = keys.shape[0], queue.shape[1]
        if size % n:
            raise ValueError(f"{name}: queue size {size} is not a multiple of the {n} keys enqueued per step")
        # the pointer stays on the device: reading it would stall the host every step. Out of place: this
        # step's loss read the old queue, and its backward may still need that very tensor (torch.compile
        # recomputes the loss's copy of it from the buffer instead of saving the copy)
        columns = (ptr + torch.arange(n, device=queue.device)) % size
        setattr(self, name, queue.index_copy(1, columns, keys.T.to(queue.dtype)))
        ptr.copy_((ptr + n) % size)

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
        # a random permutation as the order of random keys, not randperm: torch 2.11's inductor fails on CUDA
        # in its rewrite of ``x[randperm(n)]`` ("Not all inputs to pattern found in match.kwargs")
        perm = torch.rand(x.shape[0], device=x.device).argsort()
        chunks = [self.encoder_k(c) for c in x.index_select(0, perm).chunk(self.cfg.shuffle_groups)]
        inverse = torch.argsort(perm)
        return {k: torch.cat([c[k] for c in chunks]).index_select(0, inverse) for k in chunks[0]}

    def forward(self, view1, view2, matches=None, match_xy2=None, step: int | None = None):
        """Returns (loss, stats dict) and enqueues this step's keys. Views are augmented, normalised float
        tensors; ``step`` (0-based) drives per-step schedules inside an objective (DenseCL's warm-up)."""
        with torch.no_grad():
            self.momentum_update()
        loss, stats, keys = self.objective.loss(self, view1, view2, matches, match_xy2, step)
        for name, k in keys.items():
            self.enqueue(name, k)
        return loss, stats
