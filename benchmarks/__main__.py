"""Profile view-pair loader throughput for every backend on the same files, and show where the time goes.

    python -m densessl.benchmarks --data DIR|synthetic|synthetic-photo --backends torch,dali,ffcv,naive --workers 2 --batch 32 \\
                         [--reps 3] [--epochs 1] [--sweep] [--device 0] [--out runs/bench]

Per backend: pairs/s (one warm-up epoch, then ``--reps`` timed repetitions: median and spread), MB/s read, CPU
cores busy, one core's milliseconds per pair by stage, and the decode-only ceiling of that backend's decoder on
the same files (one core's rate x workers). ``--sweep`` adds pairs/s for 1..workers workers. Writes
``results.json`` and ``loaders.png`` to ``--out``. FFCV reads a .beton written (once) beside the data.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from densessl.pipeline import PairSpec, build_loader, owned  # noqa: E402
from densessl.pipeline.index import scan_image_folder  # noqa: E402

from . import stages  # noqa: E402
from .common import machine, time_loader  # noqa: E402
from .loader import DATA_HELP, backend_data, beton_for, naive_loader, resolve_data  # noqa: E402

BACKENDS = ("torch", "dali", "ffcv", "naive")
DECODER = {"torch": "simplejpeg", "naive": "PIL", "ffcv": "ffcv", "dali": "dali"}


def profile(backend: str, files, root, spec: PairSpec, batch: int, device, quick: bool) -> dict[str, float]:
    n = 16 if quick else 128
    if backend == "torch":
        return stages.reference(files, spec, batch, n)
    if backend == "naive":
        return stages.naive(files, spec.size[0], max(8, n // 2))
    if backend == "dali":
        return stages.dali(files, spec, batch, device)
    return stages.ffcv(beton_for(root, 1), spec, batch)


def measure(args, backend: str, root, spec, device, workers: int) -> dict:
    if backend == "naive":
        files = list(scan_image_folder(root).files)
        rate = time_loader(backend, naive_loader(files, args.batch, workers, spec.size[0]), args.epochs, args.reps,
                           count=lambda b: b[0].shape[0])
    else:
        loader = build_loader(backend, backend_data(backend, root, workers), spec, batch_size=args.batch,
                              workers=workers, device=device)
        rate = time_loader(backend, loader, args.epochs, args.reps)
    return {"pairs_per_s": rate.median, "runs": rate.runs, "cores": rate.cores}


def stage_order(name: str) -> tuple[int, str]:
    """Pipeline order; a fused stage ("read+decode") sorts where its first part does."""
    order = [i for i, s in enumerate(stages.STAGES) if name == s or name.startswith(s + "+")]
    return (order[0] if order else len(stages.STAGES), name)


def plot(results: dict, out: Path) -> None:
    backends = list(results["backends"])
    fig, ax = plt.subplots(1, 3 if results.get("sweep") else 2, figsize=(15, 4))
    rates = [results["backends"][b]["pairs_per_s"] for b in backends]
    spread = np.array([[r - min(results["backends"][b]["runs"]), max(results["backends"][b]["runs"]) - r]
                       for b, r in zip(backends, rates)]).T
    ax[0].bar(backends, rates, yerr=spread, capsize=4, color="tab:blue", label="view pairs/s (median, min-max)")
    ceilings = [results["backends"][b].get("decode_ceiling") or np.nan for b in backends]
    ax[0].scatter(backends, ceilings, marker="_", s=900, color="tab:red", label="decode-only ceiling (img/s)")
    ax[0].set(ylabel="per second", title="throughput", ylim=(0, 1.3 * np.nanmax([*rates, *ceilings])))
    ax[0].legend(fontsize=8, loc="upper left")  # the headroom above the bars and ceilings keeps it clear
    names = sorted({s for b in backends for s in results["backends"][b]["stages_ms"]}, key=stage_order)
    bottom = np.zeros(len(backends))
    for stage in names:
        ms = np.array([results["backends"][b]["stages_ms"].get(stage, 0.0) for b in backends])
        ax[1].bar(backends, ms, bottom=bottom, label=stage)
        bottom += ms
    ax[1].set(ylabel="ms of one core per pair", title="where the time goes")
    ax[1].legend(fontsize=7)
    if results.get("sweep"):
        for b, points in results["sweep"].items():
            ax[2].plot([p[0] for p in points], [p[1] for p in points], marker="o", label=b)
        ax[2].set(xlabel="workers / threads", ylabel="pairs/s", title="scaling")
        ax[2].set_xticks(range(1, results["workers"] + 1))
        ax[2].legend(fontsize=8)
    fig.suptitle(f"{results['images']} images, batch {results['batch']}, {results['view_size']}px views; "
                 f"{results['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m densessl.benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="synthetic", help=DATA_HELP)
    p.add_argument("--copies", type=int, default=1, help="generated sets: link each file N times")
    p.add_argument("--backends", default="torch,dali,ffcv,naive")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224, help="view size")
    p.add_argument("--epochs", type=int, default=1, help="epochs per timed repetition")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--sweep", action="store_true", help="pairs/s for 1..workers workers")
    p.add_argument("--device", type=int, default=None, help="GPU for DALI's mixed decode")
    p.add_argument("--quick", action="store_true", help="short stage profiles (CI)")
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args(argv)
    backends = args.backends.split(",")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        p.error(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
    root = resolve_data(args.data, args.copies)
    files = list(scan_image_folder(root).files)
    if len(files) < args.batch:
        p.error(f"{len(files)} images are fewer than one batch of {args.batch}")
    spec = PairSpec(size=(args.size, args.size))
    mb_per_image = float(np.mean([os.path.getsize(f) for f in files])) / 1e6
    device = args.device if torch.cuda.is_available() else None
    try:
        out = owned.claim(args.out, "benchmark", "--out")
    except owned.NotOurs as err:
        raise SystemExit(f"error: {err}") from None

    ceilings = stages.decode_ceilings(files, beton_for(root, args.workers) if "ffcv" in backends else None)
    results = {"machine": machine(), "data": str(root), "images": len(files), "batch": args.batch,
               "workers": args.workers, "view_size": args.size, "decoders_one_core_img_per_s": ceilings,
               "backends": {}}
    for backend in backends:
        r = measure(args, backend, root, spec, device, args.workers)
        r["mb_per_s"] = r["pairs_per_s"] * mb_per_image
        r["stages_ms"] = profile(backend, files, root, spec, args.batch, device, args.quick)
        if backend == "dali":  # DALI's ceiling: its own decode-only graph, same threads
            from .dali_stages import decode_pipeline, time_pipe
            pipe = decode_pipeline(files, "mixed" if device is not None else "cpu", batch_size=args.batch,
                                   num_threads=max(1, args.workers), device_id=device, seed=0)
            r["decode_ceiling"] = time_pipe("decode", pipe, max(1, len(files) // args.batch), 1, args.batch).median
        else:
            r["decode_ceiling"] = ceilings[DECODER[backend]] * max(1, args.workers)
        r["of_ceiling"] = r["pairs_per_s"] / r["decode_ceiling"]
        results["backends"][backend] = r
    if args.sweep:
        results["sweep"] = {b: [(w, measure(args, b, root, spec, device, w)["pairs_per_s"] if w < args.workers
                                 else results["backends"][b]["pairs_per_s"])  # all workers: measured above
                                for w in range(1, args.workers + 1)] for b in backends}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "loaders.png")

    print(f"{len(files)} images ({mb_per_image * 1e3:.0f} kB each) in {root}; {args.workers} workers, batch "
          f"{args.batch}, {args.size}px views, {args.reps} reps after a warm-up epoch; {machine()}")
    print(f"{'backend':8s} {'pairs/s':>9s} {'[min-max]':>17s} {'MB/s':>7s} {'cores':>6s} {'ceiling':>9s} "
          f"{'of it':>6s}  one core, ms per pair by stage")
    for b, r in results["backends"].items():
        spread = f"[{min(r['runs']):,.0f}-{max(r['runs']):,.0f}]"
        stage_text = ", ".join(f"{k} {v:.2f}" for k, v in r["stages_ms"].items())
        print(f"{b:8s} {r['pairs_per_s']:9,.0f} {spread:>17s} {r['mb_per_s']:7.1f} {r['cores']:6.2f} "
              f"{r['decode_ceiling']:9,.0f} {100 * r['of_ceiling']:5.0f}%  {stage_text}")
    for b, points in results.get("sweep", {}).items():
        print(f"sweep {b}: " + ", ".join(f"{w} -> {rate:,.0f}" for w, rate in points))
    print("decoders, one core: " + ", ".join(f"{k} {v:,.0f} img/s" for k, v in ceilings.items()))
    print(f"wrote {out / 'results.json'} and {out / 'loaders.png'}")
    return results


def cli() -> None:
    """The ``densessl-bench`` console entry point (``python -m densessl.benchmarks``)."""
    main()


if __name__ == "__main__":
    main()
