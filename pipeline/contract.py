"""The view engine's one batch, in code: what a batch holds, how a backend hands it over, what a loader does.

- ``BATCH``: every key of the batch with its dtype, shape and meaning, for any ``ViewSpec``; ``check_batch``
  holds a batch against it.
- ``pack_views`` / ``unpack_views``: every backend hands over what it produced (each sample's views end to end
  in one ``uint8`` row, the sampler's windows and match seeds, source sizes, indices) to ``pack_views``, which
  draws the matches (one kernel call per pair rule), and ``unpack_views`` makes the batch: views and matches are
  views into the packed tensors, never copies. Everything a batch says about geometry is made here, from the
  sampler's windows, so the backends cannot drift apart.
- ``PAIR_BATCH`` and ``as_pair``: the batch of a ``PairSpec`` under its documented pair keys (``view1``,
  ``geometry1``, ``matches``, ...), as views of the one batch; ``matched_views``: the views and matched pairs by
  name, what a method learns from (``model.methods``).
- ``ViewLoader``: the protocol every backend implements (iteration, ``len``, ``set_epoch``, ``state_dict``),
  ``Position`` its bookkeeping, and ``PairLoader`` a loader of a ``PairSpec``, yielding ``as_pair`` batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch

from .correspondence import sample_matches
from .geometry import crop_affines
from .views import PairSpec, ViewSpec


@dataclass(frozen=True)
class Field:
    dtype: torch.dtype
    shape: str  # symbolic: B samples, N views of a group, H x W its size, K matches of a pair
    meaning: str


BATCH = {
    "views/<group>": Field(torch.uint8, "[B,N,3,H,W]", "the group's views, RGB, unnormalised, each view "
                                                       "channels_last"),
    "affines/<group>": Field(torch.float32, "[B,N,2,3]", "each view's affine from source pixels to view pixels"),
    "tries/<group>": Field(torch.int64, "[B,N]", "draws each view needed (0: it fell back to a shared window)"),
    "matches/<view>-<view>": Field(torch.int64, "[B,K,2]", "per matched pair (views named `<group><k>`): flat "
                                                           "row-major grid cells (view i, view j)"),
    "match_xy/<view>-<view>": Field(torch.float32, "[B,K,2]", "continuous view-j grid position (x, y) of each "
                                                              "view-i cell centre; its floor is the view-j cell"),
    "source_hw": Field(torch.int64, "[B,2]", "the decoded source image's height and width"),
    "index": Field(torch.int64, "[B]", "dataset index (ImageFolder order: sorted classes, then sorted files)"),
}

# a PairSpec's batch (``as_pair``): each key is a view of the one batch's (group ``pair``, views ``pair0`` and
# ``pair1``): its key, and the view it takes along dimension 1 (None: the whole tensor)
PAIR_BATCH = {
    "view1": ("views/pair", 0, Field(torch.uint8, "[B,3,H,W]", "view 1, RGB, unnormalised, channels_last")),
    "view2": ("views/pair", 1, Field(torch.uint8, "[B,3,H,W]", "view 2, as view 1")),
    "geometry1": ("affines/pair", 0, Field(torch.float32, "[B,2,3]", "view 1's affine from source pixels to view "
                                                                     "pixels")),
    "geometry2": ("affines/pair", 1, Field(torch.float32, "[B,2,3]", "view 2's affine, as geometry1")),
    "matches": ("matches/pair0-pair1", None, Field(torch.int64, "[B,K,2]", "flat row-major grid indices (view-1 "
                                                                          "cell, view-2 cell) of K matches")),
    "match_xy2": ("match_xy/pair0-pair1", None, Field(torch.float32, "[B,K,2]", "continuous view-2 grid position "
                                                      "(x, y) of each view-1 cell centre; its floor is the view-2 cell")),
    "index": ("index", None, BATCH["index"]),
    "tries": ("tries/pair", 0, Field(torch.int64, "[B]", "pair draws the overlap rule needed (1: the first; 0: none "
                                     "overlapped enough and view 2 reuses view 1's window)")),
}


def batch_table(pairs: bool = False) -> str:
    """``BATCH`` (or, ``pairs``, ``PAIR_BATCH`` with the key of the one batch each is a view of) as the markdown
    table the READMEs show."""
    if pairs:
        rows = [f"| `{key}` | {str(f.dtype).removeprefix('torch.')} `{f.shape}` | {f.meaning} | `{source}"
                + ("" if k is None else f"[:, {k}]") + "` |" for key, (source, k, f) in PAIR_BATCH.items()]
        return "\n".join(["| key | dtype, shape | meaning | view of |", "| --- | --- | --- | --- |", *rows])
    rows = [f"| `{key}` | {str(f.dtype).removeprefix('torch.')} `{f.shape}` | {f.meaning} |"
            for key, f in BATCH.items()]
    return "\n".join(["| key | dtype, shape | meaning |", "| --- | --- | --- |", *rows])


def view_name(spec: ViewSpec, v: int) -> str:
    """The name of view ``v`` (numbered as in ``spec.views()``) in batch keys: ``<group><k>``."""
    group, k = spec.views()[v]
    return f"{group}{k}"


def matched_pairs(spec: ViewSpec) -> list[tuple[str, str]]:
    """The (view i, view j) names of every pair with matches, in the batch's order."""
    return [(view_name(spec, i), view_name(spec, j)) for i, j, rule in spec.pairs() if rule.num_matches]


def pack_views(rows, windows: np.ndarray, seeds: np.ndarray, source_hw, index, spec: ViewSpec,
               parallel: bool = True) -> dict[str, torch.Tensor]:
    """What a backend produced, with every view's affine and every matched pair's matches computed, in seven
    tensors (cheap to send between processes), from ``rows`` uint8 ``[B, spec.offsets[-1]]`` (every view end to
    end, on any device), the sampler's ``[B,V,6]`` windows and ``[B,P]`` pair seeds, ``[B,2]`` source sizes and
    ``[B]`` dataset indices.
    ``unpack_views`` makes the batch. ``parallel=False`` inside DataLoader workers (a forked worker must not use
    Numba's thread pool)."""
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
            "affines": torch.from_numpy(np.stack(affines, 1).astype(np.float32)),
            "matches": torch.from_numpy(np.concatenate(matches, 1) if matches else np.zeros((b, 0, 2), np.int64)),
            "match_xy": torch.from_numpy(np.concatenate(xy, 1) if xy else np.zeros((b, 0, 2), np.float32)),
            "source_hw": torch.as_tensor(np.asarray(source_hw, np.int64).reshape(-1, 2)),
            "index": torch.as_tensor(np.asarray(index).reshape(-1), dtype=torch.int64)}


def unpack_views(packed: dict[str, torch.Tensor], spec: ViewSpec) -> dict[str, torch.Tensor]:
    """The batch (``BATCH``) from ``pack_views``' tensors: views and matches are views into them, not copies."""
    rows, windows, b = packed["rows"], packed["windows"], packed["index"].shape[0]
    rows = rows.contiguous()
    batch, v = {}, 0
    for g in spec.groups:
        (h, w), start = g.size, int(spec.offsets[v])
        group = rows.as_strided((b, g.count, h, w, 3), (rows.stride(0), h * w * 3, w * 3, 3, 1),
                                rows.storage_offset() + start)
        batch[f"views/{g.name}"] = group.permute(0, 1, 4, 2, 3)  # each view channels_last
        batch[f"affines/{g.name}"] = packed["affines"][:, v:v + g.count]
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


class MatchedViews(NamedTuple):
    """What a method learns from, whatever the spec: every view by name (``<group><k>``, ``[B,3,H,W]``) and the
    matched pairs ``{(view i, view j): (matches, match_xy)}`` (``BATCH``'s ``matches/`` and ``match_xy/``)."""

    views: dict[str, torch.Tensor]
    pairs: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]


def matched_views(batch: dict[str, torch.Tensor], spec: ViewSpec) -> MatchedViews:
    """The batch's views and matched pairs by name, as views of its tensors (views in ``spec.views()`` order)."""
    views = {view_name(spec, v): batch[f"views/{group}"][:, k] for v, (group, k) in enumerate(spec.views())}
    pairs = {(i, j): (batch[f"matches/{i}-{j}"], batch[f"match_xy/{i}-{j}"]) for i, j in matched_pairs(spec)}
    return MatchedViews(views, pairs)


def as_pair(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``PairSpec``'s batch under the pair keys (``PAIR_BATCH``): each a view of the one batch's tensor, no
    copy. ``view1`` and ``view2`` are each channels_last; in memory a sample's two views lie end to end."""
    return {name: batch[key] if k is None else batch[key][:, k] for name, (key, k, _) in PAIR_BATCH.items()}


def _check_matches(problems: list, key: str, m, xy, k: int, grid_i, grid_j) -> None:
    if m is None or xy is None or tuple(m.shape) != (m.shape[0], k, 2) or m.dtype != torch.int64 \
            or xy.dtype != torch.float32 or xy.shape != m.shape:
        problems.append(f"{key}: expected int64 [B,{k},2] matches and float32 positions of that shape")
        return
    m, xy = m.cpu(), xy.cpu()
    if not ((m[..., 0] >= 0) & (m[..., 0] < grid_i[0] * grid_i[1])).all():
        problems.append(f"{key}: a view-i cell lies outside its grid")
    cell = xy[..., 1].floor().long() * grid_j[1] + xy[..., 0].floor().long()
    if not torch.equal(cell, m[..., 1]) or not ((m[..., 1] >= 0) & (m[..., 1] < grid_j[0] * grid_j[1])).all():
        problems.append(f"{key}: the floor of its positions does not name the view-j cell of every match")


def _check_field(problems: list, key: str, t, field: Field, dims: dict) -> None:
    want = tuple(dims[d] if d in dims else int(d) for d in field.shape.strip("[]").split(","))
    if t is None or t.dtype != field.dtype or tuple(t.shape) != want:
        got = "missing" if t is None else f"{t.dtype} {tuple(t.shape)}"
        problems.append(f"{key}: {got}, expected {field.dtype} {want}")


def check_batch(batch: dict, spec: ViewSpec | PairSpec) -> None:
    """Raise ``ValueError`` naming every way ``batch`` breaks the contract for ``spec``: ``BATCH`` for a
    ``ViewSpec``, ``PAIR_BATCH`` for a ``PairSpec`` (a test for backends)."""
    problems, b = [], batch["index"].shape[0] if "index" in batch else 0
    views = spec.view_spec
    if isinstance(spec, PairSpec):
        if set(batch) != set(PAIR_BATCH):
            raise ValueError(f"batch breaks the loader contract: keys {sorted(batch)} are not {sorted(PAIR_BATCH)}")
        dims = {"B": b, "K": spec.num_matches, "H": spec.size[0], "W": spec.size[1]}
        for key, (_, _, field) in PAIR_BATCH.items():
            _check_field(problems, key, batch[key], field, dims)
        for key in ("view1", "view2"):
            if not problems and not batch[key][:1].is_contiguous(memory_format=torch.channels_last):
                problems.append(f"{key}: not channels_last")
        if not problems:
            _check_matches(problems, "matches", batch["matches"], batch["match_xy2"], spec.num_matches, spec.grid,
                           spec.grid)
    else:
        for key in ("source_hw", "index"):
            _check_field(problems, key, batch.get(key), BATCH[key], {"B": b})
        for g in views.groups:
            dims = {"B": b, "N": g.count, "H": g.size[0], "W": g.size[1]}
            for kind in ("views", "affines", "tries"):
                _check_field(problems, f"{kind}/{g.name}", batch.get(f"{kind}/{g.name}"), BATCH[f"{kind}/<group>"],
                             dims)
            group = batch.get(f"views/{g.name}")
            if group is not None and group.dim() == 5 and not group[:1, 0].is_contiguous(
                    memory_format=torch.channels_last):  # HWC memory per view
                problems.append(f"views/{g.name}: views are not channels_last")
        names = views.views()
        for i, j, rule in views.pairs():
            if rule.num_matches:
                key = f"{view_name(views, i)}-{view_name(views, j)}"
                gi, gj = (views.group(names[v][0]).size for v in (i, j))
                _check_matches(problems, f"matches/{key}", batch.get(f"matches/{key}"), batch.get(f"match_xy/{key}"),
                               rule.num_matches, (gi[0] // views.stride, gi[1] // views.stride),
                               (gj[0] // views.stride, gj[1] // views.stride))
    if problems:
        raise ValueError("batch breaks the loader contract: " + "; ".join(problems))


@runtime_checkable
class ViewLoader(Protocol):
    """What every loader does (``pipeline.build_loader`` makes one for each backend).

    Iterating yields the batches (``BATCH``; ``PAIR_BATCH`` for a ``PairSpec``) of the current epoch from the
    current position, then moves on to the next epoch. ``len`` is the number of batches in a whole epoch for this
    rank. ``set_epoch(epoch, start_batch)`` places the loader at a batch of an epoch; ``state_dict()`` says where
    it is (``epoch``, ``batch``, and what a backend keeps internally), and a loader built with ``state=``
    continues exactly there.
    """

    spec: ViewSpec | PairSpec
    epoch: int  # the epoch being read (``Position``)
    batch: int  # batches of it yielded so far

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...

    def state_dict(self) -> dict: ...


class Position:
    """Epoch and batch bookkeeping shared by the backends that derive every batch from (seed, epoch, position).

    ``batch`` counts the batches yielded in ``epoch``; a state taken after an epoch's last batch points at the
    start of the next epoch.
    """

    def __init__(self, state: dict | None):
        self.epoch, self.batch = (int(state["epoch"]), int(state["batch"])) if state else (0, 0)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.batch = epoch, start_batch

    def state_dict(self) -> dict:
        done = self.batch >= len(self)
        return {"epoch": self.epoch + done, "batch": 0 if done else self.batch}

    def _counted(self, batches):
        """Yield ``batches`` (the rest of this epoch), counting them; then move to the next epoch."""
        for batch in batches:
            self.batch += 1
            yield batch
        self.epoch, self.batch = self.epoch + 1, 0


class PairLoader:
    """A ``PairSpec``'s loader: the engine's loader of its ``view_spec``, each batch given as ``as_pair``. Its
    position and state are the engine loader's (``engine``)."""

    def __init__(self, engine: ViewLoader, spec: PairSpec):
        self.engine, self.spec = engine, spec

    epoch = property(lambda self: self.engine.epoch)
    batch = property(lambda self: self.engine.batch)

    def __iter__(self):
        return map(as_pair, iter(self.engine))

    def __len__(self) -> int:
        return len(self.engine)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.engine.set_epoch(epoch, start_batch)

    def state_dict(self) -> dict:
        return self.engine.state_dict()
