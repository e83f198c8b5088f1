"""The MoCo machinery every method shares: query and momentum key encoders, key queues, shuffle-BN. What differs
between methods (settings, heads, queues, loss) is each method's own (``methods``).

Under DDP every rank enqueues the same all-gathered keys, so queues and pointers stay identical by construction
(the module is wrapped with ``broadcast_buffers=False``: nothing to broadcast).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from .methods import DEFAULT, MethodConfig, method_class, method_config
from .network import DenseNetwork, build_encoder, check_arch


@dataclass(frozen=True)
class ModelConfig:
    """The networks: the ``model`` section of the training configuration. With the method's settings it is
    everything that defines a model, saved in every checkpoint (``model_config``) and rebuilt from it."""

    arch: str = "resnet50"  # a torchvision ResNet or a timm ViT (network.check_arch)
    dim: int = 128  # embedding size of every head
    init_encoder: str | None = None  # encoder weights: MoCo v1/v2/v3, DenseCL, torchvision; timm, DINO, DINOv2
    sync_bn: bool = False  # SyncBatchNorm (GPU DDP) instead of shuffle-BN in the key encoder
    shuffle_groups: int = 2  # single process: key BN statistics over this many shuffled sub-batches

    def __post_init__(self):
        check_arch(self.arch)
        for name in ("dim", "shuffle_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


def model_config(model: ModelConfig, method: MethodConfig) -> dict:
    """What a checkpoint stores as ``model_config``: the model section, and the method's settings under
    ``method`` (plain types, so weights-only loading reads it back)."""
    return {**asdict(model), "method": asdict(method)}


def configs_from_checkpoint(saved: dict) -> tuple[ModelConfig, MethodConfig]:
    """The configs of a checkpoint's ``model_config``; the flat form of densessl 0.1 (``objective``, ``arch``,
    ``queue_size``, ... side by side) is read too, through each method's ``legacy`` names."""
    saved = dict(saved)
    if "method" in saved:
        method = saved.pop("method")
    else:  # densessl 0.1
        saved["sync_bn"] = not saved.pop("shuffle_bn", True)
        cls = method_class(saved.pop("objective", DEFAULT)).Config
        names = {f for f in cls.__dataclass_fields__} - {"name"}
        method = {cls.legacy.get(k, k): v for k, v in saved.items() if cls.legacy.get(k, k) in names and v is not None}
        method["name"] = cls.name
        saved = {k: v for k, v in saved.items() if k in ModelConfig.__dataclass_fields__}
    return ModelConfig(**saved), method_config(**method)


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
    """A method's query network, its momentum key network and its queues. ``forward`` encodes the views the
    method asks for and hands the outputs to the method's loss, then enqueues the keys the method returns."""

    def __init__(self, cfg: ModelConfig = ModelConfig(), method: MethodConfig | None = None):
        super().__init__()
        self.cfg, self.method_cfg = cfg, method or method_config()
        self.method = method_class(self.method_cfg.name)(self.method_cfg)
        encoder = build_encoder(cfg.arch)
        self.encoder_q = DenseNetwork(encoder, self.method.heads(encoder.channels, cfg.dim))
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        self._batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.encoder_k.modules())
        for name in self.method.queues:
            self.register_buffer(name, F.normalize(torch.randn(cfg.dim, self.method_cfg.queue_size), dim=0))
            self.register_buffer(name + "_ptr", torch.zeros((), dtype=torch.long))

    @property
    def shuffle_bn(self) -> bool:
        """Shuffled BatchNorm statistics for the keys: without BatchNorm (a ViT, whose norms are per token, and
        GroupNorm heads) a query cannot find its key through batch statistics, so keys are encoded at once."""
        return not self.cfg.sync_bn and self._batchnorm

    @torch.no_grad()
    def momentum_update(self) -> None:
        """k = m k + (1 - m) q over all parameters, as two multi-tensor kernels rather than two per tensor (the
        same arithmetic, in the same order, as the per-tensor loop)."""
        m = self.method_cfg.momentum
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
        if not self.shuffle_bn:
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

    def forward(self, views: dict[str, torch.Tensor], pairs: dict, step: int | None = None):
        """Returns (loss, stats dict) and enqueues this step's keys. ``views`` are augmented, normalised float
        tensors by name (``pair0``, ``global1``, ...), ``pairs`` the matched pairs ``{(view i, view j): (matches,
        match_xy)}`` (``pipeline.contract.matched_views``); ``step`` (0-based) drives per-step schedules inside a
        method (DenseCL's warm-up). The method says which views the query and the key network encode."""
        with torch.no_grad():
            self.momentum_update()
        queues = {name: getattr(self, name) for name in self.method.queues}
        query_views, key_views = self.method.encodes(list(pairs))
        queries = {name: self.encoder_q(views[name]) for name in query_views}
        keys = {name: self.encode_keys(views[name]) for name in key_views}
        loss, stats, new = self.method.loss(queries, keys, queues, pairs, step)
        for name, k in new.items():
            self.enqueue(name, k)
        return loss, stats
