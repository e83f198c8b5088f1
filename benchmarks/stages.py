"""Where each backend's time goes, in milliseconds of one core per view pair, and each decoder's ceiling.

Stages are timed serially in this process on the same files (one thread), so they add up to the cost of a pair
on one core; throughput with N workers is then at best N / (sum of stages). Backends whose stages are fused in
compiled code report the fused stage (DALI by difference of growing graphs, FFCV's decode+crop+resize).
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import torch
from PIL import Image

from densessl.pipeline import PairSpec, SeededSampler, as_pair, build_loader, pack_views, unpack_views
from densessl.pipeline.folder import decode_rgb
from densessl.pipeline.geometry import view_params
from densessl.pipeline.resize import cut_views

STAGES = ("read", "decode", "geometry", "crop+resize", "correspondence", "collate", "host-to-device")


class Stopwatch:
    def __init__(self):
        self.total = defaultdict(float)
        self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.total[stage] += now - self.last
        self.last = now

    def per_item_ms(self, n: int) -> dict[str, float]:
        return {k: 1000 * v / n for k, v in self.total.items()}


def _host_to_device(batch: dict, watch: Stopwatch) -> None:
    if torch.cuda.is_available():
        views = [batch["view1"].pin_memory(), batch["view2"].pin_memory()]  # pinning is part of the copy
        for v in views:
            v.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        watch.lap("host-to-device")


def sampler_keys(n_files: int, n: int, seed: int = 0) -> list[tuple[int, int]]:
    """The first ``n`` (index, seed) keys the reference loader draws in sequential order, epoch after epoch."""
    sampler, keys = SeededSampler(n_files, seed, shuffle=False), []
    while len(keys) < n:
        sampler.set_epoch(len(keys) // n_files)
        keys += list(sampler)
    return keys[:n]


def reference(files, spec: PairSpec, batch: int = 32, n: int = 128, warmup: bool = True, seed: int = 0,
              batches: list | None = None) -> dict[str, float]:
    """The reference loader's steps (its ``ViewDataset`` and collate pieces), one by one, as in a worker, on
    the keys the loader draws in sequential order; the batches made (``as_pair``) are appended to ``batches``."""
    if warmup:  # first calls load Numba's cache and torch's kernels
        reference(files, spec, min(batch, 4), 4, warmup=False)
    watch, samples, done, views = Stopwatch(), [], 0, spec.view_spec
    keys = sampler_keys(len(files), n, seed)
    for k, (index, sample_seed) in enumerate(keys):
        with open(files[index], "rb") as f:
            data = f.read()
        watch.lap("read")
        pixels = decode_rgb(data)
        watch.lap("decode")
        windows, seeds = view_params(sample_seed, pixels.shape[0], pixels.shape[1], views)
        watch.lap("geometry")
        row = np.empty(views.offsets[-1], np.uint8)
        cut_views(pixels, windows, views.arrays.sizes, views.offsets, row)
        watch.lap("crop+resize")
        samples.append((row, windows, seeds, pixels.shape[:2], index))
        if len(samples) == batch or k == n - 1:
            rows, windows, seeds, source_hw, index = (list(c) for c in zip(*samples))
            out = as_pair(unpack_views(pack_views(torch.from_numpy(np.stack(rows)), np.stack(windows),
                                                  np.stack(seeds), source_hw, index, views, parallel=False), views))
            watch.lap("correspondence+collate")
            if batches is not None:
                batches.append(out)
            _host_to_device(out, watch)
            done += len(samples)
            samples = []
    return watch.per_item_ms(done)


def naive(files, size: int, n: int = 64) -> dict[str, float]:
    import io

    from torch.utils.data import default_collate

    from .loader import NaiveTwoView

    ds = NaiveTwoView(files, size)
    ds._view(Image.open(files[0]).convert("RGB"))  # warm-up
    watch, items = Stopwatch(), []
    for i in range(n):
        with open(files[i % len(files)], "rb") as f:
            data = f.read()
        watch.lap("read")
        im = Image.open(io.BytesIO(data)).convert("RGB")
        watch.lap("decode")
        (v1, p1), (v2, _) = ds._view(im), ds._view(im)
        watch.lap("crop+resize")
        ds._to_source(p1, ds.centres)  # the numpy correspondence (at least one round of it)
        watch.lap("correspondence")
        items.append((v1, v2))
        if len(items) == 32 or i == n - 1:
            out = default_collate(items)
            watch.lap("collate")
            _host_to_device({"view1": out[0], "view2": out[1]}, watch)
            items = []
    return watch.per_item_ms(n)


def dali(files, spec: PairSpec, batch: int = 32, device: int | None = None) -> dict[str, float]:
    """DALI's graph grown stage by stage (one thread); differences give each stage's cost. The pair sampler
    runs before the decode (the CPU graph decodes only the two windows' union box), so they are one stage."""
    from densessl.pipeline.dali import views_pipeline

    from .common import time_loader
    from .dali_stages import decode_pipeline, time_pipe

    dev = "mixed" if device is not None else "cpu"
    kw = dict(batch_size=batch, num_threads=1, device_id=device, seed=0)
    batches = max(1, len(files) // batch)
    rates = [time_pipe("sampler", decode_pipeline(files, dev, spec, **kw), batches, 1, batch).median,
             time_pipe("views", views_pipeline(dict(files=files, labels=list(range(len(files)))), spec.view_spec,
                                               0, 1, dev, **kw), batches, 1, batch).median,
             time_loader("loader", build_loader("dali", files, spec, batch_size=batch, workers=1, device=device), 1,
                         1).median]
    ms = [1000 / r for r in rates]
    return {"read+geometry+decode": ms[0], "crop+resize": max(0.0, ms[1] - ms[0]),
            "correspondence+collate": max(0.0, ms[2] - ms[1])}


def ffcv(beton, spec: PairSpec, batch: int = 32) -> dict[str, float]:
    """FFCV's compiled decode + both crops (one thread), then our batch assembly (matches, tensors)."""
    loader = build_loader("ffcv", beton, spec.view_spec, batch_size=batch, workers=1, order="sequential")
    raw = list(loader.loader)  # warm-up: compiles
    start = time.perf_counter()
    raw = [(views.copy(), index.reshape(-1).astype(np.int64)) for views, _, index in loader.loader]
    fused = time.perf_counter() - start
    n = sum(len(i) for _, i in raw)
    start = time.perf_counter()
    for views, index in raw:
        loader._to_batch(views, index)
    assemble = time.perf_counter() - start
    return {"read+decode+crop+resize": 1000 * fused / n, "correspondence+collate": 1000 * assemble / n}


def decode_ceilings(files, beton=None, n: int = 200) -> dict[str, float]:
    """Images/s of one core for each backend's decoder on the same images (DALI's CPU decoder: see dali())."""
    blobs = [open(f, "rb").read() for f in files[:n]]
    import io
    rates = {}
    for name, fn in {"simplejpeg": decode_rgb,
                     "PIL": lambda b: Image.open(io.BytesIO(b)).convert("RGB").load()}.items():
        fn(blobs[0])
        start = time.perf_counter()
        for b in blobs:
            fn(b)
        rates[name] = len(blobs) / (time.perf_counter() - start)
    if beton is not None:
        from ffcv.libffcv import imdecode
        from ffcv.reader import Reader

        reader = Reader(str(beton))
        meta = reader.metadata[f"f{reader.field_names.index('image')}"]
        sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
        raw = np.fromfile(str(beton), np.uint8)
        stored = [(raw[int(m["data_ptr"]):int(m["data_ptr"]) + sizes[int(m["data_ptr"])]], int(m["height"]),
                   int(m["width"])) for m in meta[:n]]
        out = np.empty(max(h * w * 3 for _, h, w in stored), np.uint8)
        imdecode(stored[0][0], out, stored[0][1], stored[0][2], stored[0][1], stored[0][2], 0, 0, 1, 1, False,
                 False)
        start = time.perf_counter()
        for data, h, w in stored:  # FFCV's own decoder (libjpeg-turbo, fast DCT) on the stored JPEGs
            imdecode(data, out, h, w, h, w, 0, 0, 1, 1, False, False)
        rates["ffcv"] = len(stored) / (time.perf_counter() - start)
    return rates
