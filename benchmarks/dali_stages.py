"""Where DALI's view-pair time goes: the same reader and decoder with progressively more of the graph.

    python -m densessl.benchmarks.dali_stages [--data synthetic] [--device 0] [--threads 8] [--batch 256] [--copies 16]

Stages: read + decode of the whole image; read + the Numba pair sampler (overlap rule, params out) + the
loader's decode (on the CPU only the union box of the two windows); + both views cut (the full graph: DALI's
ROI resize on the GPU, the Numba resize on the CPU); the full loader (iterator, torch tensors, matches).
"""

from __future__ import annotations

import argparse
import time

from nvidia.dali import fn, pipeline_def, types

from densessl.pipeline import PairSpec, build_loader
from densessl.pipeline.dali import decode_op, views_params_op, views_pipeline
from densessl.pipeline.index import scan_image_folder

from .common import Rate, machine, time_loader
from .loader import DATA_HELP, resolve_data


@pipeline_def
def decode_pipeline(files, device: str, spec: PairSpec | None = None):
    """Read + decode the whole image (the decode-only ceiling); with ``spec``, the pair sampler and the loader's
    own decode instead (on the CPU the union box of the two windows): the full graph less the two views."""
    jpegs, _ = fn.readers.file(files=files, shuffle_after_epoch=True, name="Reader")
    if spec is None:
        return fn.decoders.image(jpegs, device=device, output_type=types.RGB)
    windows, _, _, anchor, box = views_params_op(jpegs, spec.view_spec)
    return decode_op(jpegs, anchor, box, device), windows


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
    p.add_argument("--data", default="synthetic", help=DATA_HELP)
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
    spec = PairSpec()
    order = list(range(len(files)))
    rows = [time_pipe("read + decode (whole image)", decode_pipeline(files, dev, **kw), batches, args.reps,
                      args.batch),
            time_pipe("read + pair sampler + the loader's decode", decode_pipeline(files, dev, spec, **kw), batches,
                      args.reps, args.batch),
            time_pipe("+ both views cut (full graph)",
                      views_pipeline(dict(files=files, labels=order), spec.view_spec, 0, 1, dev, **kw), batches,
                      args.reps, args.batch)]
    loader = build_loader("dali", files, spec, batch_size=args.batch, workers=args.threads, device=args.device)
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
