"""Many views from one decode: groups of views (multi-crop, as DINO, iBOT, VICRegL and Leopart draw them), each view
with its exact geometry, and matches for the pairs of views that must overlap.

``ViewSpec`` is the contract: groups of views (a count, an output size, RandomResizedCrop ``scale`` and ``ratio``,
a flip probability) and pair rules (which groups' views must overlap, by how many shared feature cells at
``stride`` or by what fraction of the image, and how many matches to sample per such pair). ``PairSpec`` is its
two-view case: ``ViewSpec.from_pair_spec`` draws exactly the windows, flips and match seeds the pair sampler
draws (tested).

Sampling (``multi_view_params``, Numba): groups are drawn in order. A group with a rule among its own views is
drawn whole, and redrawn whole until every rule it is part of holds (the pair sampler's rule); any other group
draws each view on its own and redraws that view until its rules with earlier groups hold (Leopart's rule).
After ``max_tries`` draws, a view falls back to a window built from the views drawn before it that its rules
name: inside every partner it is matched from, and around every partner matched into it, so every cell a rule
counts is shared and its matches can always be drawn (``min_area`` may then not hold); a group drawn whole
falls back as one window. With no such partner (the two-view case), a view takes its group's first window,
with its own flip, as the pair sampler does. ``tries`` is then 0.

The batch (``pack_views``, then ``unpack_views``; ``build_loader(backend, ..., spec=ViewSpec)`` on every backend):

| key | dtype, shape | meaning |
| --- | --- | --- |
| ``views/<group>`` | uint8 ``[B,N,3,H,W]`` | the group's views, RGB, unnormalised, each view channels_last |
| ``affines/<group>`` | float32 ``[B,N,2,3]`` | each view's affine from source pixels to view pixels |
| ``tries/<group>`` | int64 ``[B,N]`` | draws each view needed (0: it fell back to a shared window) |
| ``matches/<view>-<view>`` | int64 ``[B,K,2]`` | per matched pair (views named ``<group><k>``): flat grid cells (view i, view j) |
| ``match_xy/<view>-<view>`` | float32 ``[B,K,2]`` | continuous view-j grid position of each view-i cell centre |
| ``source_hw`` | int64 ``[B,2]`` | the decoded source image's height and width |
| ``index`` | int64 ``[B]`` | dataset index |

``pipeline.derived`` turns the affines into what other methods consume (boxes, intersection boxes for
``roi_align``, coordinate maps, grid-to-grid flow), on the device, with nothing carried through the resize.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np
import torch
from numba import njit

from .contract import PairSpec
from .correspondence import count_shared, sample_matches, splitmix64
from .geometry import _crop_matrix, _crop_window, _uniform, crop_affines
from .loader import ReferenceLoader, ViewPairDataset, _stack_views
from .resize import cut_views


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
    """``multi_view_params``' arguments after (seed, height, width), as ``ViewSpec.arrays`` computes them: per
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
                raise ValueError(f"group {g.name}: size={g.size} is not a multiple of the feature stride "
                                 f"{self.stride}")
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
    def from_pair_spec(cls, spec: PairSpec) -> ViewSpec:
        """The two-view case: one group of two views, their overlap rule and matches."""
        return cls((ViewGroup("views", 2, spec.size, spec.scale, spec.ratio, spec.flip_p),),
                   (PairRule(("views", "views"), spec.min_matches, 0.0, spec.num_matches),), spec.stride,
                   spec.sampler_args()[-1])

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
        """The sampler's arguments after (seed, height, width) (``multi_view_params``), computed once."""
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
            self.spec  # built once here, so a mistake is one line naming the setting
        except ValueError as err:
            raise ValueError(f"crops={self.crops!r}: {err}") from None

    @cached_property
    def spec(self) -> ViewSpec:
        spec = ViewSpec.multicrop(self.crops, self.global_scale, self.local_scale, self.min_cells, self.num_matches,
                                  self.min_area, self.stride)
        return ViewSpec(spec.groups, spec.rules, spec.stride, self.max_tries)


@njit(inline="always")
def _pair_holds(windows, sizes, i, j, min_cells, min_area, height, width, stride):
    if min_cells > 0:
        a1 = _crop_matrix(windows[i, 0], windows[i, 1], windows[i, 2], windows[i, 3], windows[i, 4] != 0,
                          sizes[i, 0], sizes[i, 1])
        a2 = _crop_matrix(windows[j, 0], windows[j, 1], windows[j, 2], windows[j, 3], windows[j, 4] != 0,
                          sizes[j, 0], sizes[j, 1])
        if count_shared(a1, a2, sizes[i, 0] // stride, sizes[i, 1] // stride, sizes[j, 0] // stride,
                        sizes[j, 1] // stride, float(stride)) < min_cells:
            return False
    if min_area > 0:
        dy = min(windows[i, 0] + windows[i, 2], windows[j, 0] + windows[j, 2]) - max(windows[i, 0], windows[j, 0])
        dx = min(windows[i, 1] + windows[i, 3], windows[j, 1] + windows[j, 3]) - max(windows[i, 1], windows[j, 1])
        if max(dy, 0) * max(dx, 0) < min_area * height * width:
            return False
    return True


@njit(inline="always")
def _draw(state, windows, crops, v, height, width):
    state, t, l, h, w = _crop_window(state, height, width, crops[v, 0], crops[v, 1], crops[v, 2], crops[v, 3])
    state, u = _uniform(state)
    windows[v, 0], windows[v, 1], windows[v, 2], windows[v, 3] = t, l, h, w
    windows[v, 4] = 1 if u < crops[v, 4] else 0
    return state


@njit(inline="always")
def _fall_back(windows, pair_views, v, drawn_until, own):
    """View ``v``'s fallback window, from the views drawn before ``drawn_until`` that a rule pairs it with: inside
    every partner whose view it is matched from (a rule ``(v, partner)`` counts ``v``'s cells), and around every
    partner matched into it (a rule ``(partner, v)``), so every cell a rule counts is shared whatever the views'
    sizes. With no such partner, or when no window can do both, ``v`` takes view ``own``'s window."""
    it, il, ib, ir, inner = 0, 0, 0, 0, False  # intersection of the partners v must lie inside
    ut, ul, ub, ur, outer = 0, 0, 0, 0, False  # union box of the partners v must contain
    for p in range(pair_views.shape[0]):
        i, j = pair_views[p, 0], pair_views[p, 1]
        o = j if i == v else i if j == v else -1
        if o < 0 or o >= drawn_until:
            continue
        t, l, b, r = windows[o, 0], windows[o, 1], windows[o, 0] + windows[o, 2], windows[o, 1] + windows[o, 3]
        if i == v:
            it, il, ib, ir = (t, l, b, r) if not inner else (max(it, t), max(il, l), min(ib, b), min(ir, r))
            inner = True
        else:
            ut, ul, ub, ur = (t, l, b, r) if not outer else (min(ut, t), min(ul, l), max(ub, b), max(ur, r))
            outer = True
    if outer and (not inner or (it <= ut and il <= ul and ub <= ib and ur <= ir)):
        windows[v, 0], windows[v, 1], windows[v, 2], windows[v, 3] = ut, ul, ub - ut, ur - ul
    elif inner and ib > it and ir > il and not outer:
        windows[v, 0], windows[v, 1], windows[v, 2], windows[v, 3] = it, il, ib - it, ir - il
    elif v != own:
        windows[v, 0:4] = windows[own, 0:4]


@njit(inline="always")
def _view_holds(windows, sizes, pair_views, cells, area, v, drawn_until, height, width, stride):
    """Every rule of view ``v`` with a view drawn before ``drawn_until`` (or ``v``'s own group, drawn) holds."""
    for p in range(pair_views.shape[0]):
        i, j = pair_views[p, 0], pair_views[p, 1]
        if (i == v and j < drawn_until) or (j == v and i < drawn_until):
            if not _pair_holds(windows, sizes, i, j, cells[p], area[p], height, width, stride):
                return False
    return True


@njit(cache=True)
def multi_view_params(seed, height, width, first, counts, sizes, crops, pair_views, cells, area, joint, fallback,
                      stride, max_tries):
    """The multi-view sampler (see the module docstring). Returns int64 ``[N,6]`` (top, left, h, w, flip,
    tries) per view and uint64 ``[P]`` match seeds per constrained pair. With one group of two views and one
    rule this is ``geometry.view_pair_params``, draw for draw. ``max_tries=0``: every view is drawn once and takes
    its fallback window (``PairSpec.same_window``)."""
    n_views = sizes.shape[0]
    windows = np.zeros((n_views, 6), np.int64)
    state = np.uint64(seed)
    for g in range(first.shape[0]):
        lo, hi = first[g], first[g] + counts[g]
        if joint[g]:  # drawn whole until every rule of the group holds
            ok = False
            for attempt in range(1, max(max_tries, 1) + 1):
                for v in range(lo, hi):
                    state = _draw(state, windows, crops, v, height, width)
                ok = max_tries > 0
                for v in range(lo, hi):
                    if not _view_holds(windows, sizes, pair_views, cells, area, v, hi, height, width, stride):
                        ok = False
                        break
                if ok:
                    for v in range(lo, hi):
                        windows[v, 5] = attempt
                    break
            if not ok:  # every view shares one window: inside the earlier partners, or the first view's
                _fall_back(windows, pair_views, lo, lo, lo)
                for v in range(lo + 1, hi):
                    windows[v, 0:4] = windows[lo, 0:4]
        else:  # each view on its own, against the groups drawn before it
            for v in range(lo, hi):
                ok = False
                for attempt in range(1, max(max_tries, 1) + 1):
                    state = _draw(state, windows, crops, v, height, width)
                    if max_tries > 0 and _view_holds(windows, sizes, pair_views, cells, area, v, lo, height, width,
                                                     stride):
                        windows[v, 5] = attempt
                        ok = True
                        break
                if not ok:
                    _fall_back(windows, pair_views, v, lo, fallback[g])
    seeds = np.empty(pair_views.shape[0], np.uint64)
    for p in range(pair_views.shape[0]):  # the first pair's seed is the stream's state, as for view pairs
        seeds[p] = state
        state, _ = splitmix64(state)
    return windows, seeds


def view_params(seed: int, height: int, width: int, spec: ViewSpec) -> tuple[np.ndarray, np.ndarray]:
    """``multi_view_params`` for one image of ``height`` x ``width`` pixels."""
    if height <= 0 or width <= 0:
        raise ValueError(f"source image has no pixels ({height}x{width})")
    return multi_view_params(np.uint64(seed), height, width, *spec.arrays)


def view_name(spec: ViewSpec, v: int) -> str:
    group, k = spec.views()[v]
    return f"{group}{k}"


def pack_views(rows, windows: np.ndarray, seeds: np.ndarray, source_hw, index, spec: ViewSpec,
               parallel: bool = True) -> dict[str, torch.Tensor]:
    """What a backend produced, with every matched pair's matches computed, in six tensors (cheap to send between
    processes): ``rows`` uint8 ``[B, spec.offsets[-1]]`` (every view end to end), the sampler's ``[B,V,6]``
    windows and ``[B,P]`` pair seeds, ``[B,2]`` source sizes and ``[B]`` dataset indices. ``unpack_views`` makes
    the batch."""
    windows = np.ascontiguousarray(windows, np.int64)
    seeds = np.ascontiguousarray(seeds).view(np.uint64)
    names = spec.views()
    affines = [crop_affines(w[:, 0], w[:, 1], w[:, 2], w[:, 3], w[:, 4], spec.group(g).size)
               for w, (g, _) in zip(windows.transpose(1, 0, 2), names)]
    matches, xy = [], []
    for p, (i, j, rule) in enumerate(spec.pairs()):
        if rule.num_matches:
            m, x, _ = sample_matches(affines[i], affines[j], seeds[:, p], rule.num_matches,
                                     spec.group(names[i][0]).size, spec.stride, parallel, spec.group(names[j][0]).size)
            matches.append(m)
            xy.append(x)
    b = windows.shape[0]
    return {"rows": torch.as_tensor(rows), "windows": torch.from_numpy(windows),
            "matches": torch.from_numpy(np.concatenate(matches, 1) if matches else np.zeros((b, 0, 2), np.int64)),
            "match_xy": torch.from_numpy(np.concatenate(xy, 1) if xy else np.zeros((b, 0, 2), np.float32)),
            "source_hw": torch.as_tensor(np.asarray(source_hw, np.int64).reshape(-1, 2)),
            "index": torch.as_tensor(np.asarray(index).reshape(-1), dtype=torch.int64)}


def unpack_views(packed: dict[str, torch.Tensor], spec: ViewSpec) -> dict[str, torch.Tensor]:
    """The multi-view batch (module docstring) from ``pack_views``' tensors: views and matches are views into
    them, not copies."""
    rows, windows, b = packed["rows"], packed["windows"], packed["index"].shape[0]
    rows = rows.contiguous()
    batch, v = {}, 0
    for g in spec.groups:
        (h, w), start = g.size, int(spec.offsets[v])
        group = rows.as_strided((b, g.count, h, w, 3), (rows.stride(0), h * w * 3, w * 3, 3, 1),
                                rows.storage_offset() + start)
        batch[f"views/{g.name}"] = group.permute(0, 1, 4, 2, 3)  # each view channels_last
        win = windows[:, v:v + g.count].numpy()
        batch[f"affines/{g.name}"] = torch.from_numpy(crop_affines(
            win[..., 0], win[..., 1], win[..., 2], win[..., 3], win[..., 4], g.size).astype(np.float32)
        ).reshape(b, g.count, 2, 3)
        batch[f"tries/{g.name}"] = windows[:, v:v + g.count, 5]
        v += g.count
    k = 0
    for i, j, rule in spec.pairs():
        if rule.num_matches:
            key = f"{view_name(spec, i)}-{view_name(spec, j)}"
            batch[f"matches/{key}"] = packed["matches"][:, k:k + rule.num_matches]
            batch[f"match_xy/{key}"] = packed["match_xy"][:, k:k + rule.num_matches]
            k += rule.num_matches
    batch["source_hw"], batch["index"] = packed["source_hw"], packed["index"]
    return batch


def check_views_batch(batch: dict, spec: ViewSpec) -> None:
    """Raise ``ValueError`` naming every way ``batch`` breaks the multi-view contract for ``spec``."""
    problems, b = [], batch["index"].shape[0]
    for key, dtype in (("source_hw", torch.int64), ("index", torch.int64)):
        if batch[key].dtype != dtype:
            problems.append(f"{key}: {batch[key].dtype}, expected {dtype}")
    for g in spec.groups:
        views, aff = batch.get(f"views/{g.name}"), batch.get(f"affines/{g.name}")
        tries = batch.get(f"tries/{g.name}")
        if tries is None or tuple(tries.shape) != (b, g.count) or tries.dtype != torch.int64:
            problems.append(f"tries/{g.name}: expected int64 {(b, g.count)}")
        if views is None or tuple(views.shape) != (b, g.count, 3, *g.size) or views.dtype != torch.uint8:
            problems.append(f"views/{g.name}: expected uint8 {(b, g.count, 3, *g.size)}")
        elif not views[:1, 0].is_contiguous(memory_format=torch.channels_last):  # HWC memory per view
            problems.append(f"views/{g.name}: views are not channels_last")
        if aff is None or tuple(aff.shape) != (b, g.count, 2, 3) or aff.dtype != torch.float32:
            problems.append(f"affines/{g.name}: expected float32 {(b, g.count, 2, 3)}")
    names = spec.views()
    for i, j, rule in spec.pairs():
        if not rule.num_matches:
            continue
        key = f"{view_name(spec, i)}-{view_name(spec, j)}"
        m, xy = batch.get(f"matches/{key}"), batch.get(f"match_xy/{key}")
        if m is None or xy is None or tuple(m.shape) != (b, rule.num_matches, 2) or m.dtype != torch.int64 \
                or xy.dtype != torch.float32:
            problems.append(f"matches/{key}: expected int64 {(b, rule.num_matches, 2)} and float32 match_xy")
            continue
        (hi, wi), (hj, wj) = (spec.group(names[v][0]).size for v in (i, j))
        gwi, ghj, gwj = wi // spec.stride, hj // spec.stride, wj // spec.stride
        if not ((m[..., 0] >= 0) & (m[..., 0] < (hi // spec.stride) * gwi)).all():
            problems.append(f"matches/{key}: a view-{view_name(spec, i)} cell lies outside its grid")
        cell = xy[..., 1].floor().long() * gwj + xy[..., 0].floor().long()
        if not torch.equal(cell, m[..., 1]) or not ((m[..., 1] >= 0) & (m[..., 1] < ghj * gwj)).all():
            problems.append(f"match_xy/{key}: its floor does not name the view-{view_name(spec, j)} cell")
    if problems:
        raise ValueError("batch breaks the multi-view contract: " + "; ".join(problems))


class MultiViewDataset(ViewPairDataset):
    """``ViewPairDataset`` for a ``ViewSpec``: one decode, every view cut from it into one row."""

    def sample(self, pixels: np.ndarray, seed: int, index: int) -> dict:
        windows, seeds = view_params(seed, pixels.shape[0], pixels.shape[1], self.spec)
        row = np.empty(self.spec.offsets[-1], np.uint8)
        cut_views(pixels, windows, self.spec.arrays.sizes, self.spec.offsets, row)
        return {"row": row, "windows": windows, "seeds": seeds, "source_hw": pixels.shape[:2], "index": index}


@dataclass(frozen=True)
class CollateViews:
    """Stacks samples and packs them with their matches (``pack_views``), inside the DataLoader's workers."""

    spec: ViewSpec
    parallel: bool = False

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        return pack_views(_stack_views([s["row"] for s in samples]), np.stack([s["windows"] for s in samples]),
                          np.stack([s["seeds"] for s in samples]), [s["source_hw"] for s in samples],
                          [s["index"] for s in samples], self.spec, self.parallel)


class ReferenceViewsLoader(ReferenceLoader):
    """The reference CPU backend for a ``ViewSpec``: the view-pair loader's sampler, workers and resume, with
    every view of a sample cut from one decode. Build it with ``pipeline.build_loader``."""

    dataset = MultiViewDataset
    collate = CollateViews

    def unpack(self, packed):
        return unpack_views(packed, self.spec)
