"""Where DALI's view-pair time goes: the same reader and decoder with progressively more of the graph.

    python -m benchmarks.dali_stages [--data synthetic] [--device 0] [--threads 8] [--batch 256] [--copies 16]

Stages: read + decode; + two ROI resizes from one crop generator (no overlap rule); the full view-pair graph
(overlap rule, redraw conditional, windows out); the full loader (iterator, torch tensors, Numba matches).
"""

from __future__ import annotations

import argparse
import time

from nvidia.dali import fn, pipeline_def, types

from pipeline.dali import DaliViewPairLoader, view_pair_pipeline
from pipeline.folder import scan_image_folder
from pipeline.geometry import ViewSpec

from .common import Rate, machine, time_loader
from .loader import resolve_data


@pipeline_def
def decode_pipeline(files, device: str, views: int, size: int):
    jpegs, _ = fn.readers.file(files=files, shuffle_after_epoch=True, name="Reader")
    image = fn.decoders.image(jpegs, device=device, output_type=types.RGB)
    if views == 0:
        return image
    shape = fn.peek_image_shape(jpegs)
    outs = []
    for _ in range(views):
        anchor, crop = fn.random_crop_generator(shape, random_area=[0.2, 1.0], random_aspect_ratio=[0.75, 4 / 3])
        start = fn.cast(anchor, dtype=types.FLOAT)
        outs.append(fn.resize(image, roi_start=start, roi_end=start + fn.cast(crop, dtype=types.FLOAT),
                              roi_relative=False, size=[size, size], antialias=True))
    return tuple(outs)


def time_pipe(name: str, pipe, batches: int, reps: int, batch: int) -> Rate:
    pipe.build()
    for _ in range(min(batches, 5)):
        pipe.run()
    runs = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(batches):
            pipe.run()
        runs.append(batches * batch / (time.perf_counter() - start))
    return Rate(name, runs)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="synthetic")
    p.add_argument("--copies", type=int, default=1)
    p.add_argument("--device", type=int, default=None, help="GPU for mixed decode (default: CPU)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    root = resolve_data(args.data, args.copies)
    files = list(scan_image_folder(root).files)
    batches = len(files) // args.batch
    dev = "mixed" if args.device is not None else "cpu"
    kw = dict(batch_size=args.batch, num_threads=args.threads, device_id=args.device, seed=0)
    spec = ViewSpec()
    rows = [time_pipe("read + decode", decode_pipeline(files, dev, 0, 224, **kw), batches, args.reps, args.batch),
            time_pipe("+ two ROI resizes", decode_pipeline(files, dev, 2, 224, **kw), batches, args.reps, args.batch)]
    order = list(range(len(files)))
    full = view_pair_pipeline(files, order, spec, 32, 4, 50, 0, 1, dev, **kw)
    rows.append(time_pipe("+ Numba pair sampler, params out", full, batches, args.reps, args.batch))
    loader = DaliViewPairLoader(root, args.batch, args.threads, args.device, spec=spec)
    rows.append(time_loader("full loader (iterator, matches)", loader, 1, args.reps))
    print(f"DALI stages: {len(files)} images in {root}, {dev} decode, {args.threads} threads, batch {args.batch}; "
          f"{machine()}")
    for r in rows:
        print(r.row())
    per_item = [1e6 / r.median for r in rows]
    print("added us per pair: " + ", ".join(f"{r.name} {b - a:+.0f}" for r, a, b in
                                             zip(rows[1:], per_item, per_item[1:])))


if __name__ == "__main__":
    main()
