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
VIEWS_OUTPUTS = ("views", "windows", "seeds", "shape", "index")  # a ViewSpec's graph
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
    union box of the two windows (``decode_op``), so each window moves by the box's corner. Written out because
    a kernel that calls another dispatcher, when first compiled inside DALI's numba plugin, is typed there with
    its scratch arrays read-only and fails (seen with an empty Numba cache)."""
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
    view) and its pairs' match seeds, drawn from the JPEG header alone, before the decode."""
    first, counts, sizes, crops, pair_views, cells, area, joint, fallback, stride, max_tries = spec.arrays
    n_windows, n_seeds = sizes.shape[0] * 6, max(1, pair_views.shape[0])

    def run(windows, seeds, shape, seed_hi, seed_lo):
        seed = (np.int64(seed_hi[0]) << 31) | np.int64(seed_lo[0])
        drawn, pair_seeds = multi_view_params(seed, shape[0], shape[1], first, counts, sizes, crops, pair_views,
                                              cells, area, joint, fallback, stride, max_tries)
        windows[:] = drawn.reshape(-1)
        seeds[:] = 0
        for p in range(pair_seeds.shape[0]):
            seeds[p] = np.int64(pair_seeds[p])

    def setup(outs, ins):
        for i in range(len(outs[0])):
            outs[0][i][0], outs[1][i][0] = n_windows, n_seeds

    shape = fn.peek_image_shape(jpegs)
    seed_hi, seed_lo = (fn.random.uniform(range=[0, _SEED_RANGE], dtype=types.INT32, shape=[1]) for _ in range(2))
    windows, seeds = numba_function(shape, seed_hi, seed_lo, run_fn=run, setup_fn=setup,
                                    out_types=[types.INT64, types.INT64], outs_ndim=[1, 1],
                                    in_types=[types.INT64, types.INT32, types.INT32], ins_ndim=[1, 1, 1])
    return windows, seeds, shape


def cut_all_views_op(image, windows, spec: ViewSpec):
    """Graph piece: every view of each image, end to end in one flat ``uint8`` row (views of several sizes in
    one output; the loader splits them), by DALI's ROI resize (antialiased linear) and flip per view, on the
    device of the decode. (The view-pair graph's Numba cutter is not used here: a Numba body that passes arrays
    it made (a view's slice of the row) to the resize kernel is typed with those arrays read-only inside DALI's
    numba plugin, depending on what was compiled before in the process.)"""
    sizes = spec.arrays[2]
    views = []
    for v in range(sizes.shape[0]):
        start = fn.cast(windows[6 * v:6 * v + 2], dtype=types.FLOAT)
        end = start + fn.cast(windows[6 * v + 2:6 * v + 4], dtype=types.FLOAT)
        out = fn.resize(image, roi_start=start, roi_end=end, roi_relative=False, size=[int(s) for s in sizes[v]],
                        interp_type=types.INTERP_LINEAR, antialias=True)
        out = fn.flip(out, horizontal=fn.cast(windows[6 * v + 4], dtype=types.INT32))
        views.append(fn.reshape(out, shape=[-1]))
    return fn.cat(*views, axis=0)


@pipeline_def(enable_checkpointing=True)
def views_pipeline(files, indices, spec: ViewSpec, shard_id: int, num_shards: int, decode_device: str):
    """A ``ViewSpec``'s graph: one decode of the whole image, every view cut from it."""
    jpegs, index = fn.readers.file(files=files, labels=indices, shard_id=shard_id, num_shards=num_shards,
                                   shuffle_after_epoch=True, name="Reader")
    windows, seeds, shape = views_params_op(jpegs, spec)
    image = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
    return cut_all_views_op(image, windows, spec), windows, seeds, shape, index


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
        outputs = VIEWS_OUTPUTS if isinstance(spec, ViewSpec) else OUTPUTS
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
        packed = pack_views(out["views"], windows, seeds, out["shape"].cpu().numpy()[:, :2],
                            out["index"].cpu().numpy(), self.spec)
        return unpack_views(packed, self.spec)
