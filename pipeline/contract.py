"""The view-pair loader contract, in code: what a pair is, what a batch holds, what a loader does.

- ``PairSpec``: how a pair of views is drawn and matched (view size, RandomResizedCrop scale and ratio, flip
  probability, feature stride, matches per pair, minimum shared cells, redraws). Validated once, when built.
- ``BATCH``: every key of a batch with its dtype, shape and meaning; ``check_batch`` holds a batch against it.
- ``ViewPairLoader``: the protocol every backend implements (iteration, ``len``, ``set_epoch``, ``state_dict``).
- ``assemble_batch``: the one function every backend calls to turn its decoded views, the pair sampler's
  parameters and the dataset indices into a batch (geometry -> affines -> matches -> tensors).

Backends differ only in how they decode images and cut views; everything a batch says about geometry is made
here, from the same 12 sampler parameters (``PARAMS``), so the backends cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterator, Protocol, runtime_checkable

import numpy as np
import torch

from .correspondence import sample_matches
from .geometry import crop_affines

# The pair sampler's output (``geometry.view_pair_params``), one int64 row per pair: both crop windows and flips,
# the draws it needed (0: the shared-window fallback) and its stream's next state, which seeds the matches.
PARAMS = ("top1", "left1", "height1", "width1", "flip1", "top2", "left2", "height2", "width2", "flip2", "tries",
          "match_seed")


@dataclass(frozen=True)
class PairSpec:
    """How one view pair is drawn and matched; every loader backend takes one, and it is checked here, once.

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

    def sampler_args(self) -> tuple:
        """The arguments of ``geometry.view_pair_params`` after (seed, height, width), in its order."""
        return (self.size[0], self.size[1], *self.scale, *self.ratio, self.flip_p, self.min_matches, self.stride,
                0 if self.same_window else self.max_tries)


@dataclass(frozen=True)
class Field:
    dtype: torch.dtype
    shape: str  # symbolic: B pairs, H x W views, K = num_matches
    meaning: str


BATCH = {
    "view1": Field(torch.uint8, "[B,3,H,W]", "view 1, RGB, unnormalised, channels_last memory"),
    "view2": Field(torch.uint8, "[B,3,H,W]", "view 2, as view 1"),
    "geometry1": Field(torch.float32, "[B,2,3]", "view 1's affine from source pixels to view pixels"),
    "geometry2": Field(torch.float32, "[B,2,3]", "view 2's affine, as geometry1"),
    "matches": Field(torch.int64, "[B,K,2]", "flat row-major grid indices (view-1 cell, view-2 cell) of K matches"),
    "match_xy2": Field(torch.float32, "[B,K,2]", "continuous view-2 grid position (x, y) of each view-1 cell "
                                                 "centre; its floor is the view-2 cell"),
    "index": Field(torch.int64, "[B]", "dataset index (ImageFolder order: sorted classes, then sorted files)"),
    "tries": Field(torch.int64, "[B]", "pair draws the overlap rule needed (1: the first; 0: none overlapped "
                                       "enough and view 2 reuses view 1's window)"),
}


def batch_table() -> str:
    """``BATCH`` as the markdown table the READMEs show."""
    rows = [f"| `{key}` | {str(f.dtype).removeprefix('torch.')} `{f.shape}` | {f.meaning} |"
            for key, f in BATCH.items()]
    return "\n".join(["| key | dtype, shape | meaning |", "| --- | --- | --- |", *rows])


def check_batch(batch: dict, spec: PairSpec) -> None:
    """Raise ``ValueError`` naming every way ``batch`` breaks the contract for ``spec`` (a test for backends)."""
    problems = []
    if set(batch) != set(BATCH):
        problems.append(f"keys {sorted(batch)} are not {sorted(BATCH)}")
    else:
        b, k, (h, w) = batch["index"].shape[0], spec.num_matches, spec.size
        dims = {"B": b, "K": k, "H": h, "W": w}
        for key, field in BATCH.items():
            want = tuple(dims[d] if d in dims else int(d) for d in field.shape.strip("[]").split(","))
            t = batch[key]
            if t.dtype != field.dtype or tuple(t.shape) != want:
                problems.append(f"{key}: {t.dtype} {tuple(t.shape)}, expected {field.dtype} {want}")
        if not problems:
            if not batch["view1"].is_contiguous(memory_format=torch.channels_last):
                problems.append("views are not in channels_last memory")
            gh, gw = spec.grid
            m, xy = batch["matches"].cpu(), batch["match_xy2"].cpu()
            if not ((m >= 0) & (m < gh * gw)).all():
                problems.append("a match index lies outside the feature grid")
            cell = xy[..., 1].floor().long() * gw + xy[..., 0].floor().long()
            if not torch.equal(cell, m[..., 1]):
                problems.append("floor(match_xy2) does not name the view-2 cell of every match")
    if problems:
        raise ValueError("batch breaks the loader contract: " + "; ".join(problems))


@runtime_checkable
class ViewPairLoader(Protocol):
    """What every view-pair loader does (``pipeline.build_loader`` makes one for each backend).

    Iterating yields the batches (``BATCH``) of the current epoch from the current position, then moves on to
    the next epoch. ``len`` is the number of batches in a whole epoch for this rank. ``set_epoch(epoch,
    start_batch)`` places the loader at a batch of an epoch; ``state_dict()`` says where it is (``epoch``,
    ``batch``, and what a backend keeps internally), and a loader built with ``state=`` continues exactly there.
    """

    spec: PairSpec
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


def assemble_batch(view1, view2, params, index, spec: PairSpec, parallel: bool = True) -> dict[str, torch.Tensor]:
    """The batch contract from what a backend produced: views ``[B,H,W,3]`` uint8 (tensors, on any device, or
    arrays), the sampler's ``[B,12]`` int64 parameters (``PARAMS``) and ``[B]`` dataset indices.

    ``parallel=False`` inside DataLoader workers (a forked worker must not use Numba's thread pool).
    """
    p = np.ascontiguousarray(params, dtype=np.int64)
    g1 = crop_affines(p[:, 0], p[:, 1], p[:, 2], p[:, 3], p[:, 4], spec.size)
    g2 = crop_affines(p[:, 5], p[:, 6], p[:, 7], p[:, 8], p[:, 9], spec.size)
    matches, xy2, _ = sample_matches(g1, g2, p[:, 11].view(np.uint64), spec.num_matches, spec.size, spec.stride,
                                     parallel)
    return {
        "view1": torch.as_tensor(view1).permute(0, 3, 1, 2),  # HWC memory: channels_last
        "view2": torch.as_tensor(view2).permute(0, 3, 1, 2),
        "geometry1": torch.from_numpy(g1.astype(np.float32)),
        "geometry2": torch.from_numpy(g2.astype(np.float32)),
        "matches": torch.from_numpy(matches),
        "match_xy2": torch.from_numpy(xy2),
        "index": torch.as_tensor(np.asarray(index).reshape(-1), dtype=torch.int64),
        "tries": torch.from_numpy(p[:, 10].copy()),
    }
