"""DALI view-pair backend: decode once (GPU ``mixed`` or CPU), cut two views, and return the windows used.

DALI's fused random-crop operators keep their crop windows to themselves (DALI issues #2576, #2206). Here the
windows are drawn explicitly with ``fn.random_crop_generator`` (RandomResizedCrop semantics), the two views are
resized from one decoded image with ``fn.resize(roi_start, roi_end)``, and windows and flips are pipeline
outputs, so the iterator rebuilds each view's affine matrix and samples matches with the Numba kernel.

The >= ``min_matches`` shared-cell rule is enforced in the graph by *resampling the whole pair*: the exact
overlap count (``geometry.axis_overlap``, integer arithmetic, equal to the Numba kernel's) is computed for the
first pair; samples that fail enter one DALI conditional that draws ``attempts - 1`` more pairs and keeps the
first acceptable one; if none is, view 2 reuses view 1's window, which overlaps fully. The iterator counts
redraws and fallbacks (``retry_stats``). Measured on 500x375 images: 0.22% of first pairs are redrawn, so with
the default 3 attempts about 5 pairs in a million fall back. Every extra attempt adds graph operators that
run each batch (10 attempts cost 35% of CPU throughput, 3 attempts about 5%).

``import pipeline.dali`` needs the ``dali`` extra (``nvidia-dali-cuda130`` or ``-cuda120``).
"""

from __future__ import annotations

import numpy as np
import torch

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("the DALI backend needs NVIDIA DALI: pip install 'densessl[dali]' "
                      "(nvidia-dali-cuda130, or nvidia-dali-cuda120 for CUDA 12 drivers)") from err

from .correspondence import sample_matches
from .folder import scan_image_folder
from .geometry import ViewSpec, axis_overlap, crop_affines

OUTPUTS = ("view1", "view2", "anchor1", "shape1", "flip1", "anchor2", "shape2", "flip2", "index", "tries")
_OPS = (dmath.floor, dmath.ceil, dmath.min, dmath.max)


def _f64(x):
    return fn.cast(x, dtype=types.FLOAT64)


def _f32(x):
    return fn.cast(x, dtype=types.FLOAT)


def _overlap(a1, s1, a2, s2, flip2, grid_hw):
    """Exact count of view-1 grid cells inside view 2 for crop windows (y, x) anchors and (h, w) shapes."""
    a1, s1, a2, s2 = _f64(a1), _f64(s1), _f64(a2), _f64(s2)
    ny = axis_overlap(a1[0], s1[0], a2[0], s2[0], float(grid_hw[0]), 0.0, *_OPS)
    nx = axis_overlap(a1[1], s1[1], a2[1], s2[1], float(grid_hw[1]), _f64(flip2), *_OPS)
    return nx * ny


def _candidate(shape, spec: ViewSpec, grid, min_matches: int) -> dict:
    """One random view pair and whether it shares at least ``min_matches`` grid cells (int64 0/1)."""
    c = {}
    for v in ("1", "2"):
        anchor, size = fn.random_crop_generator(shape, random_area=list(spec.scale),
                                                random_aspect_ratio=list(spec.ratio))
        flip = fn.random.coin_flip(probability=spec.flip_p, dtype=types.INT32)
        # int64 throughout, so both sides of the retry conditional merge with one type
        c["a" + v], c["s" + v], c["f" + v] = (fn.cast(x, dtype=types.INT64) for x in (anchor, size, flip))
    ok = fn.cast(_overlap(c["a1"], c["s1"], c["a2"], c["s2"], c["f2"], grid) >= min_matches, dtype=types.INT64)
    return c, ok


_KEYS = ("a1", "s1", "a2", "s2", "f1", "f2")


@pipeline_def(enable_conditionals=True)
def view_pair_pipeline(files, indices, spec: ViewSpec, min_matches: int, stride: int, attempts: int,
                       shard_id: int, num_shards: int, decode_device: str):
    jpegs, index = fn.readers.file(files=files, labels=indices, shard_id=shard_id, num_shards=num_shards,
                                   shuffle_after_epoch=True, name="Reader")
    shape = fn.peek_image_shape(jpegs)  # from the header: geometry is drawn before the decode finishes
    image = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
    grid = (spec.size[0] // stride, spec.size[1] // stride)

    pair, ok = _candidate(shape, spec, grid, min_matches)
    a1, s1, a2, s2, f1, f2 = (pair[k] for k in _KEYS)
    tries = ok  # 1: the first pair was accepted
    # Only the few failing samples enter this branch; inside it the redraws are selected arithmetically.
    if ok == 0:
        chosen = {k: pair[k] * 0 for k in _KEYS}
        pending = ok * 0 + 1
        for attempt in range(2, attempts + 1):
            redraw, good = _candidate(shape, spec, grid, min_matches)
            take = pending * good
            chosen = {k: chosen[k] + take * redraw[k] for k in _KEYS}
            tries = tries + take * attempt
            pending = pending - take
        fallback = {"a1": pair["a1"], "s1": pair["s1"], "a2": pair["a1"], "s2": pair["s1"], "f1": pair["f1"],
                    "f2": pair["f2"]}
        a1, s1, a2, s2, f1, f2 = (chosen[k] + pending * fallback[k] for k in _KEYS)

    def view(anchor, size, flipped):
        start = _f32(anchor)
        out = fn.resize(image, roi_start=start, roi_end=start + _f32(size), roi_relative=False,
                        size=list(spec.size), interp_type=types.INTERP_LINEAR, antialias=True)
        return fn.flip(out, horizontal=fn.cast(flipped, dtype=types.INT32))

    return view(a1, s1, f1), view(a2, s2, f2), a1, s1, f1, a2, s2, f2, index, tries


class DaliViewPairLoader:
    """Iterates the project's batch contract over a DALI pipeline (views on the GPU with ``device_id``).

    ``device_id=None`` runs everything on the CPU (tests, CPU-only machines). Sharded by ``rank`` /
    ``world_size``; with ``drop_last`` every rank yields the same number of full batches per epoch, otherwise
    the last batch is partial and each sample appears exactly once per epoch over all ranks.
    """

    def __init__(self, data, batch_size: int, threads: int = 4, device_id: int | None = None, seed: int = 0,
                 spec: ViewSpec = ViewSpec(), num_matches: int = 32, min_matches: int = 32, stride: int = 4,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True, attempts: int = 3,
                 prefetch: int = 2):
        if num_matches > min_matches:
            raise ValueError(f"num_matches={num_matches} > min_matches={min_matches}: raise min_matches")
        folder = scan_image_folder(data) if not isinstance(data, (list, tuple)) else None
        files = list(folder.files if folder else data)
        order = np.random.default_rng([seed, 0xDA11]).permutation(len(files))  # epoch 0 shuffled too
        self.spec, self.num_matches, self.stride, self.seed = spec, num_matches, stride, seed
        self.size, self.epoch, self.start = len(files), 0, 0
        self.pipe = view_pair_pipeline(
            [files[i] for i in order], order.tolist(), spec, min_matches, stride, attempts, rank, world_size,
            "mixed" if device_id is not None else "cpu", batch_size=batch_size, num_threads=threads,
            device_id=device_id, seed=seed, prefetch_queue_depth=prefetch)
        self.pipe.build()
        policy = LastBatchPolicy.DROP if drop_last else LastBatchPolicy.PARTIAL
        self.iterator = DALIGenericIterator(self.pipe, list(OUTPUTS), reader_name="Reader",
                                            last_batch_policy=policy, auto_reset=True)
        self.retry_stats = {"pairs": 0, "redrawn": 0, "fallback": 0}

    def __len__(self) -> int:
        return len(self.iterator)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Seeds this epoch's matches; ``start`` batches are skipped (a resumed run). DALI reshuffles after each
        epoch from its own reader state, so a resumed run sees a fresh order, not the interrupted one's."""
        self.epoch, self.start = epoch, start

    def __iter__(self):
        seeds = np.random.default_rng([self.seed, self.epoch, 2]).integers(0, 2**63, self.size, dtype=np.int64)
        for i, out in enumerate(self.iterator):
            if i >= self.start:
                yield self._to_batch(out[0], seeds)
        self.epoch, self.start = self.epoch + 1, 0

    def _to_batch(self, out: dict, seeds: np.ndarray) -> dict[str, torch.Tensor]:
        host = {k: out[k].cpu().numpy() for k in OUTPUTS[2:]}
        index = host["index"].reshape(-1).astype(np.int64)
        g1, g2 = (crop_affines(host[f"anchor{v}"][:, 0], host[f"anchor{v}"][:, 1], host[f"shape{v}"][:, 0],
                               host[f"shape{v}"][:, 1], host[f"flip{v}"], self.spec.size) for v in (1, 2))
        matches, xy2, _ = sample_matches(g1, g2, seeds[index].astype(np.uint64), self.num_matches,
                                         self.spec.size, self.stride)
        tries = host["tries"].reshape(-1)
        self.retry_stats["pairs"] += len(tries)
        self.retry_stats["redrawn"] += int((tries != 1).sum())
        self.retry_stats["fallback"] += int((tries == 0).sum())
        return {
            "view1": out["view1"].permute(0, 3, 1, 2),  # HWC memory: channels_last, as the reference loader
            "view2": out["view2"].permute(0, 3, 1, 2),
            "geometry1": torch.from_numpy(g1.astype(np.float32)),
            "geometry2": torch.from_numpy(g2.astype(np.float32)),
            "matches": torch.from_numpy(matches),
            "match_xy2": torch.from_numpy(xy2),
            "index": torch.from_numpy(index),
        }
