"""DALI backend: decode once (GPU ``mixed`` or CPU), cut two views (or every view of a ``ViewSpec``:
``views_pipeline``), and return the windows used.

DALI's fused random-crop operators keep their crop windows to themselves (DALI issues #2576, #2206). Here each
pair is drawn by the project's own Numba sampler (``geometry.view_pair_params``: RandomResizedCrop + flip,
redrawn until ``min_matches`` grid cells are shared, else view 2 reuses view 1's window) running inside the
graph as a DALI ``numba_function`` operator, from a per-sample seed drawn by DALI's seeded RNG and the JPEG
header, before the decode. Both views are resized from one decode (GPU: the whole image, then
``fn.resize(roi_start, roi_end)``; CPU: only the union box of the two windows, then the project's Numba resize
in a second ``numba_function``), and the sampler's 12 parameters are an output, from which the iterator
assembles the batch (``contract.assemble_batch``: affines and matches).

The same sampler as the reference and FFCV loaders means the same view distribution and overlap rule in every
backend. It runs as one compiled operator because the overlap rule built from DALI's arithmetic operators and
a redraw conditional made the sampler, not the decoder, the loader's bottleneck.

``import pipeline.dali`` needs the ``dali`` extra (``nvidia-dali-cuda130`` or ``-cuda120``).
"""

from __future__ import annotations

import numpy as np
import torch

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.numba.fn.experimental import numba_function
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("the DALI backend needs NVIDIA DALI: pip install 'densessl[dali]' "
                      "(nvidia-dali-cuda130, or nvidia-dali-cuda120 for CUDA 12 drivers)") from err

from .contract import PairSpec, Position, assemble_batch
from .folder import screen_files
from .geometry import view_pair_params, window_union
from .multicrop import ViewSpec, multi_view_params, pack_views, unpack_views
from .resize import resize_crop_aa

OUTPUTS = ("view1", "view2", "params", "index")
VIEWS_OUTPUTS = ("windows", "seeds", "shape", "index")  # a ViewSpec's graph, after one output per group
_SEED_RANGE = 2**31  # two DALI int32 draws make one 62-bit sampler seed


def _params_shape(outs, ins):
    for i in range(len(outs[0])):
        outs[0][i][0], outs[1][i][0], outs[2][i][0] = 12, 2, 2


def _sampler(spec: PairSpec):
    """A DALI numba_function body: image shape (H, W, C) and two seed halves -> view_pair_params' int64[12],
    and the union box of the two windows as ``decoders.image_slice``'s anchor (x, y) and shape (w, h)."""
    out_h, out_w, s_lo, s_hi, r_lo, r_hi, flip_p, min_matches, stride, max_tries = spec.sampler_args()

    def run(params, anchor, box, shape, seed_hi, seed_lo):
        seed = (np.int64(seed_hi[0]) << 31) | np.int64(seed_lo[0])
        params[:] = view_pair_params(seed, shape[0], shape[1], out_h, out_w, s_lo, s_hi, r_lo, r_hi, flip_p,
                                     min_matches, stride, max_tries)
        top, left, height, width = window_union(params)
        anchor[0], anchor[1], box[0], box[1] = left, top, width, height
    return run


def _views_setup(spec: PairSpec):
    out_h, out_w = spec.size

    def setup(outs, ins):
        for v in range(2):
            for i in range(len(outs[v])):
                outs[v][i][0], outs[v][i][1], outs[v][i][2] = out_h, out_w, 3
    return setup


def _cut_views(view1, view2, image, params):
    """A DALI numba_function body (CPU graphs): ``resize.cut_pair``'s two calls on an image that holds only the
    union box of the two windows (``decode_op``), so each window moves by the box's corner."""
    top, left, _, _ = window_union(params)
    resize_crop_aa(image, params[0] - top, params[1] - left, params[2], params[3], params[4] != 0, view1)
    resize_crop_aa(image, params[5] - top, params[6] - left, params[7], params[8], params[9] != 0, view2)


def pair_params_op(jpegs, spec: PairSpec):
    """Graph piece: each sample's 12 view-pair parameters (``view_pair_params``), drawn from the JPEG header
    alone, so the pair is sampled before the decode, and the union box of its two windows (anchor, shape)."""
    shape = fn.peek_image_shape(jpegs)
    seed_hi, seed_lo = (fn.random.uniform(range=[0, _SEED_RANGE], dtype=types.INT32, shape=[1]) for _ in range(2))
    return numba_function(shape, seed_hi, seed_lo, run_fn=_sampler(spec), setup_fn=_params_shape,
                          out_types=[types.INT64, types.FLOAT, types.FLOAT], outs_ndim=[1, 1, 1],
                          in_types=[types.INT64, types.INT32, types.INT32], ins_ndim=[1, 1, 1])


def decode_op(jpegs, anchor, shape, device: str):
    """Graph piece: each image as the views are cut from it. On the CPU only the union box of its pair's windows
    (``pair_params_op``'s anchor and shape): libjpeg-turbo skips the inverse DCT, upsampling and colour
    conversion outside it (rates: benchmarks/RESULTS.md), and the windows keep their source coordinates, so
    geometry is unchanged. With ``device="mixed"`` the whole image, on the GPU."""
    if device == "cpu":
        return fn.decoders.image_slice(jpegs, anchor, shape, device="cpu", output_type=types.RGB,
                                       normalized_anchor=False, normalized_shape=False)
    return fn.decoders.image(jpegs, device=device, output_type=types.RGB)


def cut_views_op(image, params, spec: PairSpec):
    """Graph piece: both views of each image from ``decode_op``. On the GPU, DALI's ROI resize and flip of the
    whole image; on the CPU the project's Numba resize of the union box, which is faster there than DALI's CPU
    resize and is the reference loader's filter."""
    if image.device == "cpu":
        return numba_function(image, params, run_fn=_cut_views, setup_fn=_views_setup(spec),
                              out_types=[types.UINT8, types.UINT8], outs_ndim=[3, 3],
                              in_types=[types.UINT8, types.INT64], ins_ndim=[3, 1])

    def view(first):  # params[first:first + 5] = top, left, height, width, flip
        start = fn.cast(params[first:first + 2], dtype=types.FLOAT)
        end = start + fn.cast(params[first + 2:first + 4], dtype=types.FLOAT)
        out = fn.resize(image, roi_start=start, roi_end=end, roi_relative=False, size=list(spec.size),
                        interp_type=types.INTERP_LINEAR, antialias=True)
        return fn.flip(out, horizontal=fn.cast(params[first + 4], dtype=types.INT32))
    return view(0), view(5)


def views_params_op(jpegs, spec: ViewSpec):
    """Graph piece: each sample's windows (``multi_view_params``: ``[V*6]``, top, left, h, w, flip, tries per
    view) and its pairs' match seeds, drawn from the JPEG header alone, before the decode; and, for the CPU
    decode, the union box of all windows (anchor x, y and shape w, h, as for a view pair)."""
    # one local per SamplerArgs field: Numba compiles ``run`` with its closure's arrays as constants, and takes
    # neither the NamedTuple nor its unpacking (``*spec.arrays``) from a closure
    first, counts, sizes, crops, pair_views, cells, area, joint, fallback, stride, max_tries = spec.arrays
    n_views, n_seeds = sizes.shape[0], max(1, pair_views.shape[0])

    def run(windows, seeds, anchor, box, shape, seed_hi, seed_lo):
        seed = (np.int64(seed_hi[0]) << 31) | np.int64(seed_lo[0])
        drawn, pair_seeds = multi_view_params(seed, shape[0], shape[1], first, counts, sizes, crops, pair_views,
                                              cells, area, joint, fallback, stride, max_tries)
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


_MAX_OUTPUTS = 6  # DALI's numba_function takes at most six outputs


def _cut_groups_body(counts: list[int]):
    """A DALI numba_function body with one ``[count, h, w, 3]`` output per group: ``resize_crop_aa`` of each
    view's window, moved by the decoded box's corner (``views_params_op``), into its index of its group's output.
    Generated for the groups because numba_function takes a fixed argument list. (Kernels compiled here once
    failed with their own scratch arrays typed read-only: FFCV had marked Numba's shared array types read-only
    in the same process; ``pipeline.ffcv`` prevents that.)"""
    outs = ", ".join(f"group{g}" for g in range(len(counts)))
    lines = [f"def run({outs}, image, windows, anchor):",
             "    top, left = np.int64(anchor[1]), np.int64(anchor[0])"]
    v = 0
    for g, count in enumerate(counts):
        lines += [f"    for n in range({count}):",
                  f"        w = windows[6 * ({v} + n):6 * ({v} + n) + 5]",
                  f"        resize_crop_aa(image, w[0] - top, w[1] - left, w[2], w[3], w[4] != 0, group{g}[n])"]
        v += count
    scope = {"np": np, "resize_crop_aa": resize_crop_aa}
    exec("\n".join(lines), scope)  # noqa: S102 - the text above, built from integers
    return scope["run"]


def cut_all_views_op(image, windows, anchor, spec: ViewSpec) -> list:
    """Graph piece: every view of each image, one ``[count, h, w, 3]`` output per group. On the CPU the project's
    Numba resize of the decoded union box (the reference loader's filter, one operator for all views); on the
    GPU, or with more groups than DALI's numba operator has outputs, DALI's ROI resize (antialiased linear) and
    flip per view of the whole image, views stacked by group."""
    groups = spec.groups
    if image.device == "cpu" and len(groups) <= _MAX_OUTPUTS:
        shapes = np.array([(g.count, *g.size, 3) for g in groups], np.int64)

        def setup(outs, ins):  # compiled by Numba: reads the shapes from an array
            for g in range(len(outs)):
                for i in range(len(outs[g])):
                    for d in range(4):
                        outs[g][i][d] = shapes[g, d]

        views = numba_function(image, windows, anchor, run_fn=_cut_groups_body([g.count for g in groups]),
                               setup_fn=setup, out_types=[types.UINT8] * len(groups), outs_ndim=[4] * len(groups),
                               in_types=[types.UINT8, types.INT64, types.FLOAT], ins_ndim=[3, 1, 1])
        return list(views) if isinstance(views, (list, tuple)) else [views]
    # the CPU decode holds only the union box (decode_op): windows move by its corner, anchor (x, y)
    corner = fn.stack(anchor[1], anchor[0]) if image.device == "cpu" else 0.0
    stacked, v = [], 0
    for g in groups:
        views = []
        for _ in range(g.count):
            start = fn.cast(windows[6 * v:6 * v + 2], dtype=types.FLOAT) - corner
            end = start + fn.cast(windows[6 * v + 2:6 * v + 4], dtype=types.FLOAT)
            out = fn.resize(image, roi_start=start, roi_end=end, roi_relative=False, size=list(g.size),
                            interp_type=types.INTERP_LINEAR, antialias=True)
            views.append(fn.flip(out, horizontal=fn.cast(windows[6 * v + 4], dtype=types.INT32)))
            v += 1
        stacked.append(fn.stack(*views))
    return stacked


@pipeline_def(enable_checkpointing=True)
def views_pipeline(files, indices, spec: ViewSpec, shard_id: int, num_shards: int, decode_device: str):
    """A ``ViewSpec``'s graph: one decode (on the CPU of the union box of the windows, with ``mixed`` of the
    whole image), every view cut from it."""
    jpegs, index = fn.readers.file(files=files, labels=indices, shard_id=shard_id, num_shards=num_shards,
                                   shuffle_after_epoch=True, name="Reader")
    windows, seeds, shape, anchor, box = views_params_op(jpegs, spec)
    image = decode_op(jpegs, anchor, box, decode_device)
    return (*cut_all_views_op(image, windows, anchor, spec), windows, seeds, shape, index)


@pipeline_def(enable_checkpointing=True)
def view_pair_pipeline(files, indices, spec: PairSpec, shard_id: int, num_shards: int, decode_device: str):
    # shuffle_after_epoch draws every shard's order from one fixed seed, whatever the pipeline's seed: the
    # shards of an epoch partition the data while each rank's random operators draw their own numbers
    jpegs, index = fn.readers.file(files=files, labels=indices, shard_id=shard_id, num_shards=num_shards,
                                   shuffle_after_epoch=True, name="Reader")
    params, anchor, shape = pair_params_op(jpegs, spec)
    view1, view2 = cut_views_op(decode_op(jpegs, anchor, shape, decode_device), params, spec)
    return view1, view2, params, index


class DaliViewPairLoader(Position):
    """The DALI backend (``backend="dali"``) behind ``contract.ViewPairLoader``; build it with
    ``pipeline.build_loader``. Views come on the GPU with ``device_id``; ``device_id=None`` runs everything on
    the CPU (tests, CPU-only machines). Sharded by ``rank`` / ``world_size``; with ``drop_last`` every rank
    yields the same number of full batches per epoch, otherwise the last batch is partial and each sample
    appears exactly once per epoch over all ranks.

    DALI's reader and random generators keep their own state, so a resumed run is exact only when the loader
    is rebuilt from ``state_dict()`` (DALI pipeline checkpointing): pass it back as ``state``.
    """

    def __init__(self, files, spec: PairSpec | ViewSpec, batch_size: int, threads: int = 4,
                 device_id: int | None = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = True, prefetch: int = 2,
                 skip_log: str | None = None, state: dict | None = None):
        files = list(files)
        # DALI's decoder aborts the pipeline on a broken file: screen headers and end markers first (rank 0
        # logs what was left out; every rank drops the same files, so shards still partition the data)
        keep = np.asarray(screen_files(files, skip_log if rank == 0 else None), np.int64)
        if len(keep) == 0:
            raise ValueError(f"none of the {len(files)} files is a readable image")
        order = keep[np.random.default_rng([seed, 0xDA11]).permutation(len(keep))]  # epoch 0 shuffled too
        self.spec, self.seed, self.size = spec, seed, len(keep)
        if state is not None and state.get("size") != self.size:
            raise ValueError(f"the loader state was saved over {state.get('size')} images, this data set has "
                             f"{self.size}: resume on the same data, or start a new run")
        # the epoch and how many of its batches DALI has delivered; skip: batches to drop (set_epoch)
        Position.__init__(self, state)
        self.skip = 0
        rank_seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0] >> 1)  # ranks draw apart
        build = views_pipeline if isinstance(spec, ViewSpec) else view_pair_pipeline
        self.pipe = build(
            [files[i] for i in order], order.tolist(), spec, rank, world_size,
            "mixed" if device_id is not None else "cpu", batch_size=batch_size, num_threads=threads,
            device_id=device_id, seed=rank_seed, prefetch_queue_depth=prefetch,
            checkpoint=state["dali"] if state else None)
        self.pipe.build()
        policy = LastBatchPolicy.DROP if drop_last else LastBatchPolicy.PARTIAL
        outputs = ([f"group{g}" for g in range(len(spec.groups))] + list(VIEWS_OUTPUTS)
                   if isinstance(spec, ViewSpec) else OUTPUTS)
        self.iterator = DALIGenericIterator(self.pipe, list(outputs), reader_name="Reader",
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
        return {**super().state_dict(), "dali": self.iterator.checkpoints()[0], "size": self.size}

    def __iter__(self):
        for out in self._counted(self.iterator):
            if self.batch > self.skip:
                yield self._to_batch(out[0])
        self.skip = 0

    def _to_batch(self, out: dict) -> dict[str, torch.Tensor]:
        if isinstance(self.spec, ViewSpec):
            return self._to_views_batch(out)
        return assemble_batch(out["view1"], out["view2"], out["params"].cpu().numpy(), out["index"].cpu().numpy(),
                              self.spec)

    def _to_views_batch(self, out: dict) -> dict[str, torch.Tensor]:
        """The batch from each sample's row of views (on the device the views came on), the sampler's windows
        and seeds."""
        b = out["index"].shape[0]
        windows = out["windows"].cpu().numpy().reshape(b, -1, 6)
        seeds = out["seeds"].cpu().numpy()[:, :len(self.spec.pairs())]
        rows = torch.cat([out[f"group{g}"].reshape(b, -1) for g in range(len(self.spec.groups))], 1)
        packed = pack_views(rows, windows, seeds, out["shape"].cpu().numpy()[:, :2],
                            out["index"].cpu().numpy(), self.spec)
        return unpack_views(packed, self.spec)
