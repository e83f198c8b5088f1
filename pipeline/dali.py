"""DALI backend: decode once (GPU ``mixed`` or CPU), cut every view of a ``ViewSpec`` (a ``PairSpec``'s two
views, or multi-crop's groups) into one row per sample, and return the windows used: one graph per device.

DALI's fused random-crop operators keep their crop windows to themselves (DALI issues #2576, #2206). Here the
views are drawn by the project's own Numba sampler (``geometry.draw_views``: RandomResizedCrop + flip and the
spec's overlap rules) running inside the graph as a DALI ``numba_function`` operator, from a per-sample seed
drawn by DALI's seeded RNG and the JPEG header, before the decode. Every view is resized from one decode (GPU:
the whole image, then ``fn.resize(roi_start, roi_end)`` per view; CPU: only the union box of the windows, then
``resize.cut_views`` in a second ``numba_function``), and the windows and match seeds are outputs, from which
the iterator packs the batch (``contract.pack_views``: affines and matches).

The same sampler and cutter as the reference and FFCV loaders means the same views in every backend. The
sampler runs as one compiled operator because the overlap rule built from DALI's arithmetic operators and a
redraw conditional made the sampler, not the decoder, the loader's bottleneck.

``import pipeline.dali`` needs the ``dali`` extra (``nvidia-dali-cuda130`` or ``-cuda120``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.numba.fn.experimental import numba_function
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("the DALI backend needs NVIDIA DALI: pip install 'densessl[dali]' "
                      "(nvidia-dali-cuda130, or nvidia-dali-cuda120 for CUDA 12 drivers)") from err

from .contract import Position, pack_views, unpack_views
from .index import DataIndex
from .geometry import draw_views
from .resize import cut_views
from .views import ViewSpec

OUTPUTS = ("rows", "windows", "seeds", "shape", "index")
GRAPH = "views-1"  # the graph a state_dict() was taken from; another graph's DALI state cannot be restored
_SEED_RANGE = 2**31  # two DALI int32 draws make one 62-bit sampler seed


def views_params_op(jpegs, spec: ViewSpec):
    """Graph piece: each sample's windows (``geometry.draw_views``: ``[V*6]``, top, left, h, w, flip, tries per
    view) and its pairs' match seeds, drawn from the JPEG header alone, before the decode; and, for the CPU
    decode, the union box of all windows (anchor x, y and shape w, h)."""
    # one local per SamplerArgs field: Numba compiles ``run`` with its closure's arrays as constants, and takes
    # neither the NamedTuple nor its unpacking (``*spec.arrays``) from a closure
    first, counts, sizes, crops, pair_views, cells, area, joint, fallback, stride, max_tries = spec.arrays
    n_views, n_seeds = sizes.shape[0], max(1, pair_views.shape[0])

    def run(windows, seeds, anchor, box, shape, seed_hi, seed_lo):
        seed = (np.int64(seed_hi[0]) << 31) | np.int64(seed_lo[0])
        drawn, pair_seeds = draw_views(seed, shape[0], shape[1], first, counts, sizes, crops, pair_views, cells, area,
                                       joint, fallback, stride, max_tries)
        windows[:] = drawn.reshape(-1)
        seeds[:] = 0
        for p in range(pair_seeds.shape[0]):
            seeds[p] = np.int64(pair_seeds[p])
        top, left = drawn[:, 0].min(), drawn[:, 1].min()
        anchor[0], anchor[1] = left, top
        box[0], box[1] = (drawn[:, 1] + drawn[:, 3]).max() - left, (drawn[:, 0] + drawn[:, 2]).max() - top

    def setup(outs, ins):
        for i in range(len(outs[0])):
            outs[0][i][0], outs[1][i][0], outs[2][i][0], outs[3][i][0] = n_views * 6, n_seeds, 2, 2

    shape = fn.peek_image_shape(jpegs)
    seed_hi, seed_lo = (fn.random.uniform(range=[0, _SEED_RANGE], dtype=types.INT32, shape=[1]) for _ in range(2))
    windows, seeds, anchor, box = numba_function(
        shape, seed_hi, seed_lo, run_fn=run, setup_fn=setup,
        out_types=[types.INT64, types.INT64, types.FLOAT, types.FLOAT], outs_ndim=[1, 1, 1, 1],
        in_types=[types.INT64, types.INT32, types.INT32], ins_ndim=[1, 1, 1])
    return windows, seeds, shape, anchor, box


def decode_op(jpegs, anchor, shape, device: str):
    """Graph piece: each image as the views are cut from it. On the CPU only the union box of its windows
    (``views_params_op``'s anchor and shape): libjpeg-turbo skips the inverse DCT, upsampling and colour
    conversion outside it (rates: benchmarks/RESULTS.md), and the windows keep their source coordinates, so
    geometry is unchanged. With ``device="mixed"`` the whole image, on the GPU."""
    if device == "cpu":
        return fn.decoders.image_slice(jpegs, anchor, shape, device="cpu", output_type=types.RGB,
                                       normalized_anchor=False, normalized_shape=False)
    return fn.decoders.image(jpegs, device=device, output_type=types.RGB)


def _cut_views_body(spec: ViewSpec):
    """A DALI numba_function body (CPU graphs): ``resize.cut_views`` of every view into the sample's one row, on
    an image that holds only the union box of the windows, so each window moves by the box's corner."""
    sizes, offsets = spec.arrays.sizes, spec.offsets

    def run(row, image, windows, anchor):
        moved = windows.reshape(-1, 6).copy()
        moved[:, 0] -= np.int64(anchor[1])
        moved[:, 1] -= np.int64(anchor[0])
        cut_views(image, moved, sizes, offsets, row)
    return run


def cut_views_op(image, windows, anchor, spec: ViewSpec):
    """Graph piece: every view of each image, end to end in one ``uint8`` row per sample (``ViewSpec.offsets``).
    On the CPU the project's Numba cutter on the decoded union box (the reference loader's filter, one operator
    for all views); on the GPU DALI's ROI resize (antialiased linear) and flip of the whole image per view."""
    if image.device == "cpu":
        length = int(spec.offsets[-1])

        def setup(outs, ins):
            for i in range(len(outs[0])):
                outs[0][i][0] = length

        return numba_function(image, windows, anchor, run_fn=_cut_views_body(spec), setup_fn=setup,
                              out_types=[types.UINT8], outs_ndim=[1], in_types=[types.UINT8, types.INT64, types.FLOAT],
                              ins_ndim=[3, 1, 1])
    return resize_views_op(image, windows, spec)


def resize_views_op(image, windows, spec: ViewSpec):
    """Graph piece: every view of each whole image (the GPU decode) by DALI's ROI resize (antialiased linear)
    and flip, each view flattened and all of them concatenated into the sample's row. Runs on any device (the
    tests run it on the CPU)."""
    views = []
    for v, (group, _) in enumerate(spec.views()):
        start = fn.cast(windows[6 * v:6 * v + 2], dtype=types.FLOAT)
        end = start + fn.cast(windows[6 * v + 2:6 * v + 4], dtype=types.FLOAT)
        out = fn.resize(image, roi_start=start, roi_end=end, roi_relative=False, size=list(spec.group(group).size),
                        interp_type=types.INTERP_LINEAR, antialias=True)
        views.append(fn.reshape(fn.flip(out, horizontal=fn.cast(windows[6 * v + 4], dtype=types.INT32)), shape=[-1]))
    return fn.cat(*views) if len(views) > 1 else views[0]


@pipeline_def(enable_checkpointing=True)
def views_pipeline(source: dict, spec: ViewSpec, shard_id: int, num_shards: int, decode_device: str):
    """The one graph: one decode (on the CPU of the union box of the windows, with ``mixed`` of the whole image),
    every view cut from it into the sample's row. ``source``: the file reader's ``files`` and ``labels`` (each
    file's index), or ``file_root`` and ``file_list`` (``write_file_list``)."""
    # shuffle_after_epoch draws every shard's order from one fixed seed, whatever the pipeline's seed: the
    # shards of an epoch partition the data while each rank's random operators draw their own numbers
    jpegs, index = fn.readers.file(**source, shard_id=shard_id, num_shards=num_shards, shuffle_after_epoch=True,
                                   name="Reader")
    windows, seeds, shape, anchor, box = views_params_op(jpegs, spec)
    image = decode_op(jpegs, anchor, box, decode_device)
    return cut_views_op(image, windows, anchor, spec), windows, seeds, shape, index


def write_file_list(index: DataIndex, order: np.ndarray) -> Path:
    """The files ``order`` names, one ``<path relative to index.root> <index>`` line each, in a new temporary
    file (in the index folder when the index is cached there): DALI's reader parses such a list itself, where a
    Python list of 1.28M paths took it seconds to take in (one-off numbers: benchmarks/RESULTS.md,
    "ImageNet-scale folders")."""
    blob, offsets = index.paths.blob.tobytes(), index.paths.offsets
    fd, name = tempfile.mkstemp(".txt", ".dali-files-", index.file.parent if index.file else None)
    with os.fdopen(fd, "wb") as f:
        for a in range(0, len(order), 65536):  # in blocks: no Python object per file outlives its block
            block = order[a:a + 65536]
            f.write(b"".join([b"%s %d\n" % (blob[s:e], i) for s, e, i in
                              zip(offsets[block].tolist(), (offsets[block + 1] - 1).tolist(), block.tolist())]))
    return Path(name)


class DaliLoader(Position):
    """The DALI backend (``backend="dali"``) behind ``contract.ViewLoader``; build it with
    ``pipeline.build_loader``. Views come on the GPU with ``device_id``; ``device_id=None`` runs everything on
    the CPU (tests, CPU-only machines). Sharded by ``rank`` / ``world_size``; with ``drop_last`` every rank
    yields the same number of full batches per epoch, otherwise the last batch is partial and each sample
    appears exactly once per epoch over all ranks.

    DALI's reader and random generators keep their own state, so a resumed run is exact only when the loader
    is rebuilt from ``state_dict()`` (DALI pipeline checkpointing): pass it back as ``state``.
    """

    def __init__(self, index: DataIndex, keep: np.ndarray, spec: ViewSpec, batch_size: int, threads: int = 4,
                 device_id: int | None = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True, prefetch: int = 2, state: dict | None = None):
        # ``keep``: the indices of the files that passed screening (``screening.screen_index``): DALI's decoder
        # aborts the pipeline on a broken file. Every rank keeps the same files, so shards still partition the data
        keep = np.asarray(keep, np.int64)
        if len(keep) == 0:
            raise ValueError(f"none of the {len(index)} files is a readable image")
        order = keep[np.random.default_rng([seed, 0xDA11]).permutation(len(keep))]  # epoch 0 shuffled too
        self.spec, self.seed, self.size = spec, seed, len(keep)
        if state is not None and state.get("graph") != GRAPH:
            raise ValueError("the DALI loader state was saved by an earlier densessl's DALI graph, which this version "
                             "cannot restore: resume it with the densessl that wrote it, or start a new run")
        if state is not None and state.get("size") != self.size:
            raise ValueError(f"the loader state was saved over {state.get('size')} images, this data set has "
                             f"{self.size}: resume on the same data, or start a new run")
        # the epoch and how many of its batches DALI has delivered; skip: batches to drop (set_epoch)
        Position.__init__(self, state)
        self.skip = 0
        rank_seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0] >> 1)  # ranks draw apart
        if (index.paths.blob == ord("\n")).any():  # a name with a line break cannot be a line of a file list
            file_list, source = None, {"files": [index.paths[i] for i in order], "labels": order.tolist()}
        else:
            file_list = write_file_list(index, order)
            source = {"file_root": str(index.root), "file_list": str(file_list)}
        try:
            self.pipe = views_pipeline(
                source, spec, rank, world_size,
                "mixed" if device_id is not None else "cpu", batch_size=batch_size, num_threads=threads,
                device_id=device_id, seed=rank_seed, prefetch_queue_depth=prefetch,
                checkpoint=state["dali"] if state else None)
            self.pipe.build()  # the reader has read the list
        finally:
            if file_list is not None:
                file_list.unlink()
        policy = LastBatchPolicy.DROP if drop_last else LastBatchPolicy.PARTIAL
        self.iterator = DALIGenericIterator(self.pipe, list(OUTPUTS), reader_name="Reader",
                                            last_batch_policy=policy, auto_reset=True)

    def __len__(self) -> int:
        return len(self.iterator)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Continue at batch ``start_batch`` of ``epoch``. Exact where the loader already is (the next epoch, or
        the position of the ``state`` it was built from). Elsewhere DALI's reader and RNG carry on from their own
        state and ``start_batch`` batches are dropped: the right count, not the batches an unbroken run saw."""
        if (epoch, start_batch) != (self.epoch, self.batch):
            super().set_epoch(epoch, 0)
            self.skip = start_batch

    def state_dict(self) -> dict:
        """The position and DALI's reader and RNG state, after the batches yielded so far (DALI's checkpoint
        after an epoch's last batch starts the next epoch, as the position does)."""
        return {**super().state_dict(), "dali": self.iterator.checkpoints()[0], "size": self.size, "graph": GRAPH}

    def __iter__(self):
        for out in self._counted(self.iterator):
            if self.batch > self.skip:
                yield self._to_batch(out[0])
        self.skip = 0

    def _to_batch(self, out: dict) -> dict[str, torch.Tensor]:
        """The batch from each sample's row of views (on the device the views came on), the sampler's windows
        and seeds."""
        b = out["index"].shape[0]
        windows = out["windows"].cpu().numpy().reshape(b, -1, 6)
        seeds = out["seeds"].cpu().numpy()[:, :len(self.spec.pairs())]
        packed = pack_views(out["rows"], windows, seeds, out["shape"].cpu().numpy()[:, :2],
                            out["index"].cpu().numpy(), self.spec)
        return unpack_views(packed, self.spec)
