"""What a method is, and the settings every method has.

A method says what is learned: its settings (a ``MethodConfig`` subclass, the ``method`` section of the training
configuration, checked when it is built), the heads it puts on the encoder, the key queues it keeps and how many
keys each matched pair of views adds to them, which views it takes (one pair, or any views: ``pairs_only``), which views are
encoded by the query and by the key network, its loss, and the output evaluation reads as its dense features.

A method sees views by name (``<group><k>``: ``pair0``, ``global1``, ``local3``) and the matched pairs the
pipeline provides (``contract.matched_views``: ``{(view i, view j): (matches, match_xy)}``), whatever the spec:
a view pair is the one-pair case. The flow is one way, as in moco's ``builder.py``: the holder (``builder.MoCo``)
runs the networks and hands their outputs and the queues to ``Method.loss``, which returns the loss, its parts
and the keys to enqueue; a method never calls back into its holder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class MethodConfig:
    """The settings every method has. ``legacy`` maps the flat keys of densessl 0.1 (and of its checkpoints'
    ``model_config``) that a subclass renamed to the subclass's field names."""

    name: str = ""
    temperature: float = 0.2  # InfoNCE temperature
    queue_size: int = 65536  # keys in each queue of negatives
    momentum: float = 0.999  # key encoder: m k + (1 - m) q per step; 0: the query's weights under stop-gradient

    legacy: ClassVar[dict[str, str]] = {"moco_momentum": "momentum"}

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        if self.queue_size < 1:
            raise ValueError(f"queue_size={self.queue_size} must be >= 1")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum={self.momentum} must be in [0, 1) (0: keys from the query encoder's "
                             "weights under stop-gradient)")


class Method:
    """One objective. A subclass sets ``Config`` and the class attributes below and implements ``heads`` and
    ``loss``; ``methods.register`` makes it available by its config's ``name``."""

    Config: ClassVar[type[MethodConfig]] = MethodConfig
    queues: ClassVar[tuple[str, ...]] = ()  # key queues the holder keeps (buffers of these names)
    dense_output: ClassVar[str | None] = None  # the network output read as dense features; None: global only
    dense_stride: ClassVar[int | None] = None  # stride of the grid the matches index; None: matches unused

    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg

    def heads(self, channels: tuple[int, ...], dim: int) -> dict[str, nn.Module]:
        """The modules put on the encoder, by attribute name: each reads C2..C5 and adds the network output its
        ``output`` attribute names (``network.DenseNetwork``)."""
        raise NotImplementedError

    def pairs_only(self) -> str | None:
        """None, or why this method (with its settings) learns from one pair of views only: other views are then
        refused in one line (``check``)."""
        return None

    def keys_per_pair(self, num_matches: int) -> int:
        """Keys each matched pair of views adds to each of its queues per step."""
        return 1

    def keys_per_sample(self, views) -> int:
        """Keys each sample adds to each queue per step, for ``views`` (a ``ViewSpec`` or a preset): the sum over
        its matched pairs."""
        return sum(self.keys_per_pair(rule.num_matches) for _, _, rule in views.view_spec.pairs()
                   if rule.num_matches)

    def encodes(self, pairs) -> tuple[list[str], list[str]]:
        """The views the query network and the key network encode, in order, given the matched pairs ``(view i,
        view j)``: by default each pair's first view queries (in the pairs' order) and its second gives keys (in
        name order: the order shuffle-BN draws its permutations in)."""
        queries = list(dict.fromkeys(i for i, _ in pairs))
        return queries, sorted({j for _, j in pairs})

    def check(self, views, global_batch: int) -> None:
        """The rules that tie this method to the views (a ``ViewSpec`` or a preset) and the batch, as one-line
        ``ValueError``s that name the keys to change (``method.*``, ``views.*``, ``optim.batch_size``)."""
        spec = views.view_spec
        why = self.pairs_only()
        if why and (len(spec.views()) != 2 or sum(r.num_matches > 0 for _, _, r in spec.pairs()) != 1):
            raise ValueError(f"views: method.name={self.cfg.name} learns from one pair of views ({why}), not "
                             f"{len(spec.views())} views; use method.name=vader (not symmetric) or mocov2 for "
                             "multi-crop views, or a views section without crops")
        stride = spec.stride
        if self.dense_stride not in (None, stride):
            raise ValueError(f"views.stride={stride}: method.name={self.cfg.name} embeds pixels at stride "
                             f"{self.dense_stride}, so its matches must index that grid; set views.stride="
                             f"{self.dense_stride}")
        keys = global_batch * self.keys_per_sample(spec)
        if self.queues and keys == 0:
            raise ValueError("views: no pair of views has matches, so this method has no keys to learn from; set "
                             "views.num_matches (and a rule between views) above 0")
        size = self.cfg.queue_size
        if self.queues and size % keys:
            raise ValueError(f"method.queue_size={size} is not a multiple of the {keys} keys enqueued per step "
                             f"(optim.batch_size x keys per sample); pick e.g. {keys * max(1, size // keys)}")

    def loss(self, queries: dict[str, dict[str, torch.Tensor]], keys: dict[str, dict[str, torch.Tensor]],
             queues: dict[str, torch.Tensor], pairs: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]],
             step: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(loss, stats, {queue name: keys to enqueue}) from the query network's outputs per view and the key
        network's (``encodes``), the queues, the matched pairs ``{(view i, view j): (matches, match_xy)}`` and
        the 0-based step (``None``: outside training, schedules at their end)."""
        raise NotImplementedError
