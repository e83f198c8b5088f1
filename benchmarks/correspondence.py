"""Throughput of the Numba correspondence kernels: view pairs/s, single thread and parallel.

    python -m densessl.benchmarks.correspondence [--pairs 8192] [--reps 5]
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np

from densessl.pipeline.correspondence import flow, sample_matches, set_threads
from densessl.pipeline import PairSpec, sample_view_pair

from .common import Rate, machine


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=8192)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--matches", type=int, default=32)
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    start = time.perf_counter()
    pairs = [sample_view_pair(seed, 375, 500, PairSpec()) for seed in range(args.pairs)]
    sampling = args.pairs / (time.perf_counter() - start)
    a1, a2 = np.stack([q.affine1 for q in pairs]), np.stack([q.affine2 for q in pairs])
    seeds = rng.integers(0, 2**63, args.pairs).astype(np.uint64)

    def rate(name, fn):
        fn()  # compile / load from cache
        runs = []
        for _ in range(args.reps):
            t = time.perf_counter()
            fn()
            runs.append(args.pairs / (time.perf_counter() - t))
        return Rate(name, runs)

    cores = numba.config.NUMBA_NUM_THREADS
    rows = []
    for threads in sorted({1, cores}):
        set_threads(threads)
        par = threads > 1
        rows.append(rate(f"sample_matches K={args.matches}, {threads} thread(s)",
                         lambda: sample_matches(a1, a2, seeds, args.matches, parallel=par)))
        rows.append(rate(f"flow 56x56, {threads} thread(s)", lambda: flow(a1, a2, parallel=par)))
    print(f"correspondence kernels, 224x224 views, stride 4, {args.pairs} pairs of 500x375 images; {machine()}")
    for r in rows:
        print(r.row())
    print(f"{'sample_view_pair (Numba sampler + Python wrapper)':44s} {sampling:12,.0f} pairs/s")
    single = rows[0].median
    print(f"target >= 50,000 pairs/s per core: sample_matches {single:,.0f} pairs/s on one core -> "
          f"{'met' if single >= 50_000 else 'NOT met'}")


if __name__ == "__main__":
    main()
