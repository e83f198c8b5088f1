"""Reference CPU loader: decode once, cut every view into one row, pack the batch (matches) in the collate step.

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

from .contract import Position, pack_views, unpack_views
from .folder import read_first_readable
from .geometry import Crop, view_params
from .resize import cut_views, resize_crop_aa
from .views import ViewSpec

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
    """The crop window of an HxWx3 uint8 image resized to ``size`` and flipped: hxwx3 uint8, with the filter
    every CPU backend cuts views with (``resize.resize_crop_aa``); for previews and evaluation crops."""
    view = np.empty((*size, 3), np.uint8)
    resize_crop_aa(pixels, crop.top, crop.left, crop.height, crop.width, crop.flip, view)
    return view


class ViewDataset(Dataset):
    """Items are ``(index, seed)`` keys from ``SeededSampler``; returns one decoded image's views (cut into one
    row, ``resize.cut_views``), the sampler's windows and match seeds, and the index of the image.

    A file that cannot be read or decoded (``BadImage``: truncated, empty, not an image, too large) is replaced
    by the next readable file in index order, with the same seed, so batches stay full and deterministic. Each
    replacement is warned about and, with ``skip_log``, appended to that file (path, reason) for the trainer.
    """

    def __init__(self, files, spec: ViewSpec, skip_log: str | None = None):
        # ``files``: a sequence of paths, kept as given: an index's ``Paths`` (arrays) keeps each worker's memory
        # flat over an epoch, where a list of strings is copied page by page as workers read it
        self.files, self.spec, self.skip_log = files, spec, skip_log

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key):
        index, seed = key
        index, pixels = read_first_readable(self.files, index, self.skip_log)
        windows, seeds = view_params(seed, pixels.shape[0], pixels.shape[1], self.spec)
        row = np.empty(self.spec.offsets[-1], np.uint8)
        cut_views(pixels, windows, self.spec.arrays.sizes, self.spec.offsets, row)
        return {"row": row, "windows": windows, "seeds": seeds, "source_hw": pixels.shape[:2], "index": index}


@dataclass(frozen=True)
class CollateViews:
    """Stacks samples and packs them with their matches (``contract.pack_views``: one kernel call per pair
    rule for the whole batch), inside the DataLoader's workers."""

    spec: ViewSpec
    parallel: bool = False  # collate runs inside DataLoader workers

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        return pack_views(_stack_views([s["row"] for s in samples]), np.stack([s["windows"] for s in samples]),
                          np.stack([s["seeds"] for s in samples]), [s["source_hw"] for s in samples],
                          [s["index"] for s in samples], self.spec, self.parallel)


def _stack_views(views: list[np.ndarray]) -> torch.Tensor:
    """Stack rows of views; inside a worker, straight into shared memory, saving the copy torch makes to send
    it."""
    out = torch.empty((len(views), *views[0].shape), dtype=torch.uint8)
    if torch.utils.data.get_worker_info() is not None:
        out.share_memory_()
    np.stack(views, out=out.numpy())
    return out


def _worker_init(_):
    torch.set_num_threads(1)  # workers are the parallelism


class ReferenceLoader(Position):
    """The reference CPU backend (``backend="torch"``): a torch DataLoader over ``SeededSampler`` with decode
    and view cutting in its workers, and the batch unpacked in the main process. Implements
    ``contract.ViewLoader``; build it with ``pipeline.build_loader``."""

    def __init__(self, files, spec: ViewSpec, batch_size: int, workers: int = 2, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, drop_last: bool = True, pin_memory: bool = False,
                 prefetch_factor: int = 4, skip_log: str | None = None, state: dict | None = None):
        super().__init__(state)
        self.spec, self.batch_size, self.drop_last = spec, batch_size, drop_last
        self.sampler = SeededSampler(len(files), seed, shuffle, rank, world_size)
        self.loader = DataLoader(
            ViewDataset(files, spec, skip_log), batch_size=batch_size, sampler=self.sampler,
            num_workers=workers, collate_fn=CollateViews(spec, parallel=workers == 0), drop_last=drop_last,
            pin_memory=pin_memory, worker_init_fn=_worker_init, persistent_workers=workers > 0,
            # its own generator: starting an epoch must not draw from torch's global RNG (exact resume)
            generator=torch.Generator().manual_seed(seed),
            prefetch_factor=prefetch_factor if workers > 0 else None,
        )

    def __len__(self) -> int:
        per_rank = self.sampler.per_rank()
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def __iter__(self):
        self.sampler.set_epoch(self.epoch, self.batch * self.batch_size)
        return self._counted(unpack_views(packed, self.spec) for packed in self.loader)
