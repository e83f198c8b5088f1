"""Reference CPU view-pair loader: decode once, cut two views, sample matches in the collate step.

Randomness never comes from worker state. ``SeededSampler`` (in the main process) draws the order and one seed
per sample from ``(seed, epoch)``; a sample's views depend only on its seed and the batch's matches only on the
seeds of its samples. The same seed therefore gives the same batches for any number of workers or ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .correspondence import sample_matches
from .folder import read_first_readable, scan_image_folder
from .geometry import Crop, ViewSpec, sample_view_pair
from .resize import resize_crop_aa

_SEED_SPACE = 2**63


class SeededSampler(Sampler):
    """Yields ``(index, sample_seed)``: shuffled by ``(seed, epoch)``, sharded by rank like DistributedSampler.

    A sample's seed depends on ``(seed, epoch, index)`` alone, so the same image gets the same views in an
    epoch whatever the world size. ``set_epoch(epoch, start)`` skips the first ``start`` samples of this rank's
    share, which is how a resumed run continues mid-epoch.
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if size <= 0:
            raise ValueError("cannot sample from an empty data set")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def per_rank(self) -> int:
        if self.drop_last:
            return self.size // self.world_size
        return math.ceil(self.size / self.world_size)

    def __len__(self) -> int:
        return self.per_rank() - self.start

    def __iter__(self):
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.size) if self.shuffle
                 else np.arange(self.size))
        total = self.per_rank() * self.world_size
        if total > self.size:  # pad by wrapping around, as DistributedSampler does
            order = np.concatenate([order, order[: total - self.size]])
        mine = order[:total][self.rank::self.world_size][self.start:]
        seeds = np.random.default_rng([self.seed, self.epoch, 1]).integers(0, _SEED_SPACE, self.size, dtype=np.int64)
        for i in mine:
            yield int(i), int(seeds[i])


def render_view(pixels: np.ndarray, crop: Crop, size: tuple[int, int]) -> np.ndarray:
    """The crop window of an HxWx3 uint8 image resized to ``size`` and flipped: hxwx3 uint8.

    The one antialiased resize every CPU backend uses (``resize_crop_aa``: torch's ``antialias=True`` bilinear
    filter to one grey level), so the reference, FFCV and DALI-CPU loaders cut identical views from the same
    windows. It reads the window in place; torch's SIMD path needs a contiguous copy of it first (the loader
    measured 4% slower with it, benchmarks/RESULTS.md).
    """
    view = np.empty((*size, 3), np.uint8)
    resize_crop_aa(pixels, crop.top, crop.left, crop.height, crop.width, crop.flip, view)
    return view


class ViewPairDataset(Dataset):
    """Items are ``(index, seed)`` keys from ``SeededSampler``; returns one decoded image's two views.

    A file that cannot be read or decoded (``BadImage``: truncated, empty, not an image, too large) is replaced
    by the next readable file in index order, with the same seed, so batches stay full and deterministic. Each
    replacement is warned about and, with ``skip_log``, appended to that file (path, reason) for the trainer.
    """

    def __init__(self, files, spec: ViewSpec = ViewSpec(), min_matches: int = 32, stride: int = 4,
                 skip_log: str | None = None):
        self.files, self.spec = list(files), spec
        self.min_matches, self.stride, self.skip_log = min_matches, stride, skip_log

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key):
        index, seed = key
        index, pixels = read_first_readable(self.files, index, self.skip_log)
        pair = sample_view_pair(seed, pixels.shape[0], pixels.shape[1], self.spec, self.min_matches, self.stride)
        return {
            "view1": render_view(pixels, pair.crop1, self.spec.size),
            "view2": render_view(pixels, pair.crop2, self.spec.size),
            "geometry1": pair.affine1,
            "geometry2": pair.affine2,
            "index": index,
            "match_seed": pair.match_seed,
        }


@dataclass(frozen=True)
class CollateViewPairs:
    """Stacks samples into the batch contract and samples the matches for the whole batch in one kernel call.

    Views are returned as ``[B,3,H,W]`` uint8 tensors in channels_last memory (a zero-copy view of the HWC
    pixels), which is what a channels_last model consumes.
    """

    num_matches: int = 32
    view_size: tuple[int, int] = (224, 224)
    stride: int = 4
    parallel: bool = False  # collate runs inside DataLoader workers

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        g1 = np.stack([s["geometry1"] for s in samples])
        g2 = np.stack([s["geometry2"] for s in samples])
        seeds = np.array([s["match_seed"] for s in samples], np.uint64)
        matches, xy2, _ = sample_matches(g1, g2, seeds, self.num_matches, self.view_size, self.stride,
                                          self.parallel)
        views = {k: _stack_views([s[k] for s in samples]).permute(0, 3, 1, 2) for k in ("view1", "view2")}
        return {
            **views,
            "geometry1": torch.from_numpy(g1.astype(np.float32)),
            "geometry2": torch.from_numpy(g2.astype(np.float32)),
            "matches": torch.from_numpy(matches),
            "match_xy2": torch.from_numpy(xy2),
            "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
        }


def _stack_views(views: list[np.ndarray]) -> torch.Tensor:
    """Stack HWC views; inside a worker, straight into shared memory, saving the copy torch makes to send it."""
    out = torch.empty((len(views), *views[0].shape), dtype=torch.uint8)
    if torch.utils.data.get_worker_info() is not None:
        out.share_memory_()
    np.stack(views, out=out.numpy())
    return out


def _worker_init(_):
    torch.set_num_threads(1)  # workers are the parallelism


def make_loader(data, batch_size: int, workers: int = 2, seed: int = 0, spec: ViewSpec = ViewSpec(),
                num_matches: int = 32, min_matches: int = 32, stride: int = 4, rank: int = 0,
                world_size: int = 1, shuffle: bool = True, drop_last: bool = True, pin_memory: bool = False,
                prefetch_factor: int = 4, skip_log: str | None = None) -> DataLoader:
    """The reference loader over an ImageFolder root (or a list of files). Call ``loader.sampler.set_epoch``."""
    if num_matches > min_matches:
        raise ValueError(f"num_matches={num_matches} > min_matches={min_matches}: views could share fewer "
                         "cells than the matches asked for; raise min_matches")
    files = data if isinstance(data, (list, tuple)) else scan_image_folder(data).files
    if drop_last and len(files) // world_size < batch_size:
        raise ValueError(f"{len(files)} images give each of {world_size} rank(s) fewer than one batch of "
                         f"{batch_size}; lower --batch or use more data")
    sampler = SeededSampler(len(files), seed, shuffle, rank, world_size)
    return DataLoader(
        ViewPairDataset(files, spec, min_matches, stride, skip_log), batch_size=batch_size, sampler=sampler,
        num_workers=workers, collate_fn=CollateViewPairs(num_matches, spec.size, stride, parallel=workers == 0),
        drop_last=drop_last,
        pin_memory=pin_memory, worker_init_fn=_worker_init, persistent_workers=workers > 0,
        # its own generator: starting an epoch must not draw from torch's global RNG (exact resume)
        generator=torch.Generator().manual_seed(seed),
        prefetch_factor=prefetch_factor if workers > 0 else None,
    )
