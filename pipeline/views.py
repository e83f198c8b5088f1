"""What views are drawn: the one spec type of the view engine, and its presets.

``ViewSpec`` is the contract: groups of views (``ViewGroup``: a count, an output size, RandomResizedCrop
``scale`` and ``ratio``, a flip probability) and pair rules (``PairRule``: which groups' views must overlap, by
how many shared feature cells at ``stride`` or by what fraction of the image, and how many matches to sample per
such pair). Every backend, the sampler (``geometry.view_params``), the cutter (``resize.cut_views``) and the batch
(``contract``) take a ``ViewSpec``.

Presets, which users write and the training configuration's ``views`` section holds:
- ``PairSpec``: two views of one size that share ``min_matches`` cells, with ``num_matches`` matches (VADeR's
  pair); its ``view_spec`` is one group ``pair`` of two views and one rule, drawn exactly as the pair sampler
  of earlier versions drew (``tests/frozen``).
- ``ViewSpec.multicrop`` / ``MultiCropViews``: DINO-style global and local views.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, NamedTuple

import numpy as np

@dataclass(frozen=True)
class ViewGroup:
    """``count`` views of ``size`` (H, W; one number: square), each a RandomResizedCrop (``scale``, ``ratio``)
    flipped with probability ``flip_p``."""

    name: str
    count: int
    size: int | tuple[int, int]
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5

    def __post_init__(self):
        if isinstance(self.size, int):
            object.__setattr__(self, "size", (self.size, self.size))
        for name in ("size", "scale", "ratio"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.name.isidentifier() or self.name[-1].isdigit():
            raise ValueError(f"group name {self.name!r} must be an identifier not ending in a digit (views are "
                             "named <group><k> in batch keys)")
        if self.count < 1:
            raise ValueError(f"group {self.name}: count={self.count} must be >= 1")
        if len(self.size) != 2 or min(self.size) <= 0:
            raise ValueError(f"group {self.name}: size={self.size} must be one or two positive numbers")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"group {self.name}: scale={self.scale} must satisfy 0 < min <= max <= 1")
        if len(self.ratio) != 2 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"group {self.name}: ratio={self.ratio} must satisfy 0 < min <= max")
        if not 0 <= self.flip_p <= 1:
            raise ValueError(f"group {self.name}: flip_p={self.flip_p} must be a probability")


@dataclass(frozen=True)
class PairRule:
    """Every view of group ``groups[0]`` and every (other) view of ``groups[1]`` must share at least
    ``min_cells`` cells of the first view's feature grid, and a window intersection of at least ``min_area`` of
    the image; ``num_matches`` matches are sampled for each such pair (0: none)."""

    groups: tuple[str, str]
    min_cells: int = 0
    min_area: float = 0.0
    num_matches: int = 0

    def __post_init__(self):
        object.__setattr__(self, "groups", tuple(self.groups))
        if len(self.groups) != 2:
            raise ValueError(f"rule {self.groups}: name two groups")
        if self.min_cells < 0 or self.num_matches < 0 or not 0 <= self.min_area <= 1:
            raise ValueError(f"rule {self.groups}: min_cells={self.min_cells} and num_matches={self.num_matches} "
                             f"must be >= 0 and min_area={self.min_area} in [0, 1]")
        if self.num_matches > self.min_cells:
            raise ValueError(f"rule {self.groups}: num_matches={self.num_matches} > min_cells={self.min_cells}: "
                             "views could share fewer cells than the matches asked for, so raise min_cells")


class SamplerArgs(NamedTuple):
    """``geometry.draw_views``' arguments after (seed, height, width), as ``ViewSpec.arrays`` computes them: per
    group, per view and per constrained pair (views numbered as in ``ViewSpec.views``). Passed to the Numba
    kernels unpacked (``*spec.arrays``), in this order."""

    first: np.ndarray  # [G] int64: each group's first view
    counts: np.ndarray  # [G] int64: views per group
    sizes: np.ndarray  # [V, 2] int64: each view's (height, width)
    crops: np.ndarray  # [V, 5] float64: scale min/max, ratio min/max, flip probability
    pair_views: np.ndarray  # [P, 2] int64: the views (i, j) of each constrained pair
    cells: np.ndarray  # [P] int64: the cells of i a pair must share with j
    area: np.ndarray  # [P] float64: the least overlap of a pair's windows, as a fraction of the image
    joint: np.ndarray  # [G] bool: a group whose views are constrained among themselves
    fallback: np.ndarray  # [G] int64: the view whose window a group's views take when the draws run out
    stride: int
    max_tries: int


@dataclass(frozen=True)
class ViewSpec:
    """Groups of views and the rules between them; checked once, here."""

    groups: tuple[ViewGroup, ...]
    rules: tuple[PairRule, ...] = ()
    stride: int = 4
    max_tries: int = 50

    def __post_init__(self):
        object.__setattr__(self, "groups", tuple(self.groups))
        object.__setattr__(self, "rules", tuple(self.rules))
        names = [g.name for g in self.groups]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"groups {names}: give at least one group, each name once")
        if self.stride < 1 or self.max_tries < 0:
            raise ValueError(f"stride={self.stride} must be >= 1 and max_tries={self.max_tries} >= 0 (0: every view "
                             "takes its fallback window)")
        for g in self.groups:
            if g.size[0] % self.stride or g.size[1] % self.stride:
                near = " x ".join(" or ".join(str(n) for n in (s // self.stride * self.stride,
                                                                s // self.stride * self.stride + self.stride) if n)
                                  for s in g.size)
                raise ValueError(f"group {g.name}: size={g.size} is not a multiple of the feature stride "
                                 f"{self.stride} (nearest: {near})")
        seen = set()
        for rule in self.rules:
            unknown = [n for n in rule.groups if n not in names]
            if unknown:
                raise ValueError(f"rule {rule.groups}: no group named {unknown[0]} (groups: {', '.join(names)})")
            if frozenset(rule.groups) in seen:
                raise ValueError(f"rule {rule.groups}: two rules for the same groups")
            seen.add(frozenset(rule.groups))
            first = self.group(rule.groups[0])
            cells = (first.size[0] // self.stride) * (first.size[1] // self.stride)
            if rule.min_cells > cells:
                raise ValueError(f"rule {rule.groups}: min_cells={rule.min_cells} exceeds the {cells} cells of "
                                 f"group {first.name}'s feature grid")
            if rule.groups[0] == rule.groups[1] and first.count < 2:
                raise ValueError(f"rule {rule.groups}: group {first.name} has one view, no pair within it")
            largest = min(self.group(n).scale[1] for n in rule.groups)
            if rule.min_area > largest:
                raise ValueError(f"rule {rule.groups}: min_area={rule.min_area} exceeds the largest window of a "
                                 f"view (scale up to {largest}): the rule could never hold")

    @classmethod
    def multicrop(cls, text: str = "2x224,6x96", global_scale=(0.32, 1.0), local_scale=(0.05, 0.32),
                  min_cells: int = 32, num_matches: int = 32, min_area: float = 0.01, stride: int = 4) -> ViewSpec:
        """DINO-style views from ``"NxSIZE,MxSIZE"``: global views (dinov2's scales by default) that share
        ``min_cells`` cells pairwise with ``num_matches`` matches, and local views that each overlap every
        global view by ``min_area`` of the image (Leopart's 1%) and share ``min_cells`` of their own cells with it
        (at most all of them), with ``num_matches`` matches into it."""
        parts = [p.strip().split("x") for p in text.split(",") if p.strip()]
        if not 1 <= len(parts) <= 2 or any(len(p) != 2 or not (p[0].isdigit() and p[1].isdigit()) for p in parts):
            raise ValueError(f"views={text!r}: expected NxSIZE or NxSIZE,MxSIZE, e.g. 2x224,6x96")
        groups = [ViewGroup("global", int(parts[0][0]), int(parts[0][1]), global_scale)]
        rules = [PairRule(("global", "global"), min_cells, 0.0, num_matches)] if groups[0].count > 1 else []
        if len(parts) == 2:
            groups.append(ViewGroup("local", int(parts[1][0]), int(parts[1][1]), local_scale))
            local_cells = (int(parts[1][1]) // stride) ** 2
            rules.append(PairRule(("local", "global"), min(min_cells, local_cells), min_area,
                                  min(num_matches, local_cells)))
        return cls(tuple(groups), tuple(rules), stride)

    @cached_property
    def offsets(self) -> np.ndarray:
        """Where each view starts in a sample's row of views: every backend cuts all of a sample's views end to
        end into one flat ``uint8`` row (one buffer to move between processes), split by ``unpack_views``."""
        sizes = self.arrays.sizes
        return np.concatenate([[0], np.cumsum(sizes[:, 0] * sizes[:, 1] * 3)]).astype(np.int64)

    @property
    def view_spec(self) -> ViewSpec:
        """Itself: every spec (``PairSpec``, ``MultiCropViews``) names the ``ViewSpec`` it draws this way."""
        return self

    def group(self, name: str) -> ViewGroup:
        return next(g for g in self.groups if g.name == name)

    def views(self) -> list[tuple[str, int]]:
        """(group, k) of every view, in the sampler's order."""
        return [(g.name, k) for g in self.groups for k in range(g.count)]

    def pairs(self) -> list[tuple[int, int, PairRule]]:
        """(view i, view j, rule) of every constrained pair, views numbered as in ``views``."""
        views, out = self.views(), []
        for rule in self.rules:
            for i, (gi, ki) in enumerate(views):
                for j, (gj, kj) in enumerate(views):
                    same = rule.groups[0] == rule.groups[1]
                    if gi == rule.groups[0] and gj == rule.groups[1] and i != j and (not same or i < j):
                        out.append((i, j, rule))
        return out

    @cached_property
    def arrays(self) -> SamplerArgs:
        """The sampler's arguments after (seed, height, width) (``geometry.draw_views``), computed once."""
        views = self.views()
        index = {g.name: n for n, g in enumerate(self.groups)}
        first = np.cumsum([0] + [g.count for g in self.groups])[:-1].astype(np.int64)
        counts = np.array([g.count for g in self.groups], np.int64)
        sizes = np.array([self.group(g).size for g, _ in views], np.int64)
        crops = np.array([[*self.group(g).scale, *self.group(g).ratio, self.group(g).flip_p] for g, _ in views])
        pairs = self.pairs()
        pair_views = np.array([[i, j] for i, j, _ in pairs], np.int64).reshape(-1, 2)
        cells = np.array([r.min_cells for _, _, r in pairs], np.int64)
        area = np.array([r.min_area for _, _, r in pairs], np.float64)
        joint = np.array([any(r.groups[0] == r.groups[1] == g.name for r in self.rules) for g in self.groups])
        fallback = np.empty(len(self.groups), np.int64)  # the view a group's views fall back to
        for n, g in enumerate(self.groups):
            partners = [index[o] for r in self.rules if g.name in r.groups for o in r.groups]
            earliest = min(partners, default=n)
            fallback[n] = first[earliest]
        return SamplerArgs(first, counts, sizes, crops, pair_views, cells, area, joint, fallback, self.stride,
                           self.max_tries)


@dataclass(frozen=True)
class MultiCropViews:
    """The training configuration's ``views`` section for multi-crop (``views.crops=2x224,6x96``): DINO-style
    global and local views (``ViewSpec.multicrop``), global views sharing ``min_cells`` cells pairwise, each local
    view overlapping every global view by ``min_area`` of the image, ``num_matches`` matches per such pair."""

    crops: str = "2x224,6x96"
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    min_cells: int = 32
    num_matches: int = 32
    min_area: float = 0.01
    stride: int = 4
    max_tries: int = 50

    def __post_init__(self):
        for name in ("global_scale", "local_scale"):
            value = tuple(getattr(self, name))
            object.__setattr__(self, name, value)
            if len(value) != 2 or not 0 < value[0] <= value[1] <= 1:
                raise ValueError(f"{name}={value} must satisfy 0 < min <= max <= 1")
        for name in ("min_cells", "num_matches", "stride", "max_tries"):
            if getattr(self, name) < (0 if name in ("min_cells", "num_matches") else 1):
                raise ValueError(f"{name}={getattr(self, name)} is out of range")
        if not 0 <= self.min_area <= 1:
            raise ValueError(f"min_area={self.min_area} must be in [0, 1]")
        try:
            self.view_spec  # built once here, so a mistake is one line naming the setting
        except ValueError as err:
            raise ValueError(f"crops={self.crops!r}: {err}") from None

    @cached_property
    def view_spec(self) -> ViewSpec:
        spec = ViewSpec.multicrop(self.crops, self.global_scale, self.local_scale, self.min_cells, self.num_matches,
                                  self.min_area, self.stride)
        return ViewSpec(spec.groups, spec.rules, spec.stride, self.max_tries)


@dataclass(frozen=True)
class PairSpec:
    """How one view pair is drawn and matched (the two-view preset of ``ViewSpec``), checked here, once.

    ``size`` is the (H, W) of both views (one number: square views); each view is a RandomResizedCrop
    (``scale``, ``ratio``, torchvision's semantics) flipped with probability ``flip_p``. The feature grid has
    ``size / stride`` cells; a pair is redrawn (up to ``max_tries`` times, then view 2 reuses view 1's window)
    until its views share at least ``min_matches`` cells, and ``num_matches`` of those are sampled as matches.
    ``same_window``: view 2 always takes view 1's window, with its own flip (VADeR's Table 3 "same view").
    """

    size: int | tuple[int, int] = (224, 224)
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    stride: int = 4
    num_matches: int = 32
    min_matches: int = 32
    max_tries: int = 50
    same_window: bool = False

    # the flat keys of densessl 0.1's training configuration that are this spec's fields under other names
    legacy: ClassVar[dict[str, str]] = {"view_size": "size", "crop_scale": "scale", "crop_ratio": "ratio",
                                        "feature_stride": "stride"}

    def __post_init__(self):
        if isinstance(self.size, int):
            object.__setattr__(self, "size", (self.size, self.size))
        for name in ("size", "scale", "ratio"):  # YAML hands over lists
            object.__setattr__(self, name, tuple(getattr(self, name)))
        problem = self._first_problem()
        if problem:  # one line that starts with the setting at fault
            raise ValueError(problem)

    def _first_problem(self) -> str | None:
        if len(self.size) != 2 or min(self.size) <= 0:
            return f"size={self.size} must be two positive numbers (H, W), or one"
        if self.stride < 1:
            return f"stride={self.stride} must be >= 1"
        if self.size[0] % self.stride or self.size[1] % self.stride:
            return f"size={self.size} is not a multiple of the feature stride {self.stride}"
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            return f"scale={self.scale} must satisfy 0 < min <= max <= 1"
        if len(self.ratio) != 2 or not 0 < self.ratio[0] <= self.ratio[1]:
            return f"ratio={self.ratio} must satisfy 0 < min <= max"
        if not 0 <= self.flip_p <= 1:
            return f"flip_p={self.flip_p} must be a probability"
        for name in ("num_matches", "min_matches", "max_tries"):
            if getattr(self, name) < 1:
                return f"{name}={getattr(self, name)} must be at least 1"
        if self.num_matches > self.min_matches:
            return (f"num_matches={self.num_matches} > min_matches={self.min_matches}: views could share fewer "
                    "cells than the matches asked for, so raise min_matches")
        if self.min_matches > self.cells:
            return (f"min_matches={self.min_matches} exceeds the {self.cells} cells of the {self.grid[0]}x"
                    f"{self.grid[1]} feature grid")
        return None

    @property
    def grid(self) -> tuple[int, int]:
        """Feature-grid (rows, columns) of a view."""
        return self.size[0] // self.stride, self.size[1] // self.stride

    @property
    def cells(self) -> int:
        return self.grid[0] * self.grid[1]

    @cached_property
    def view_spec(self) -> ViewSpec:
        """The pair as the engine draws it: one group ``pair`` of two views and their overlap rule. A pair is
        drawn whole until its views share ``min_matches`` cells (``same_window``: never, so view 2 takes view 1's
        window, with its own flip)."""
        return ViewSpec((ViewGroup("pair", 2, self.size, self.scale, self.ratio, self.flip_p),),
                        (PairRule(("pair", "pair"), self.min_matches, 0.0, self.num_matches),), self.stride,
                        0 if self.same_window else self.max_tries)
