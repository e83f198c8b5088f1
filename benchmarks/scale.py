"""ImageNet-scale start-up: how long a loader takes to its first batch over a folder of 1.28M files, and what it
costs in memory, for the torch and DALI backends.

    python -m densessl.benchmarks.scale --files 1281000

The folder (``--dir``, made once and reused) holds ``--files`` hard links to 64 photo-like JPEGs in 1,000 class
folders: the page cache is hot, so this is the best case for the file system and the numbers are what densessl
itself costs. Each measurement runs in a fresh process, with a fresh index folder for each first start:
- first start (nothing cached) and second start (the index and, for DALI, the screening verdicts cached): the
  index (scan or load), ``build_loader``, the first batch;
- PSS of the main process and of the loader's workers after the first batch, and of forked processes (as
  DataLoader forks its workers) after each has read every path of the loader's dataset;
- the bytes each file costs screening (``/proc/self/io``'s ``rchar``);
- the same scaled linearly to 14M files (ImageNet-21k).

``--package DIR`` runs the measurements with the densessl found in DIR (an older checkout, for a before/after).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 2**20
CLASSES = 1000
IMAGENET_21K = 14_000_000


def make_folder(folder: Path, files: int) -> Path:
    """``folder/train/<class>/<name>.JPEG``: ``files`` hard links to 64 photo-like JPEGs (``photos``), made once
    (a folder of the same count is reused; only a folder this benchmark made is ever written into)."""
    from densessl.pipeline import owned

    from .photos import write_photo_set

    owned.claim(folder, "scale-folder", "--dir")
    root, done = folder / "train", folder / ".complete"
    if done.is_file() and done.read_text() == str(files):
        return root
    owned.replace(folder, "scale-folder", "--dir")
    photos = sorted((write_photo_set(folder / "photos", count=64)).rglob("*.jpg"))
    start = time.perf_counter()
    for c in range(CLASSES):
        d = root / f"n{c:08d}"
        d.mkdir(parents=True)
        for k in range(c * files // CLASSES, (c + 1) * files // CLASSES):
            os.link(photos[k % len(photos)], d / f"n{c:08d}_{k}.JPEG")
    done.write_text(str(files))
    print(f"made {files:,} links in {root} in {time.perf_counter() - start:.0f} s", flush=True)
    return root


# --- one measurement, in its own process ---------------------------------------------------------------------------

def pss_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return int(re.search(r"^Pss:\s+(\d+) kB", text, re.M).group(1)) / 1024


def children(pid: int) -> list[int]:
    import psutil
    return [c.pid for c in psutil.Process(pid).children(recursive=True)]


def read_bytes() -> int:
    return int(re.search(r"rchar: (\d+)", Path("/proc/self/io").read_text()).group(1))


def private_dirty_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return int(re.search(r"^Private_Dirty:\s+(\d+) kB", text, re.M).group(1)) / 1024


def _touch_all(paths, barrier, out) -> None:
    """A forked worker: its PSS and copied (private dirty) memory before and after reading every path, as a
    worker reads its samples' paths over an epoch. The barriers keep the set of processes sharing pages the same
    for both readings."""
    me = os.getpid()
    barrier.wait()
    before = pss_mib(me), private_dirty_mib(me)
    barrier.wait()
    n = 0
    for i in range(len(paths)):
        n += len(paths[i])
    barrier.wait()
    out.put((*before, pss_mib(me), private_dirty_mib(me)))


def measure(backend: str, root: str, batch: int, workers: int) -> dict:
    """One start of ``backend`` over ``root`` in this process: seconds and MiB (see the module docstring)."""
    import densessl.pipeline as pipeline
    from densessl.pipeline import PairSpec, build_loader

    out, indexed = {}, hasattr(pipeline, "data_index")
    start = time.perf_counter()
    if indexed:
        data = pipeline.data_index(root)
        files = data.paths
    else:  # an older densessl: build_loader scans the folder again
        data = root
        files = pipeline.scan_image_folder(root).files
    out["scan_s"] = time.perf_counter() - start
    if backend == "dali" and indexed:
        from densessl.pipeline.screening import screen_index
        before, screened = read_bytes(), time.perf_counter()
        data, _ = screen_index(data)
        out["screen_s"] = time.perf_counter() - screened
        out["screen_bytes_per_file"] = (read_bytes() - before) / len(files)
    built, before = time.perf_counter(), read_bytes()
    loader = build_loader(backend, data, PairSpec(), batch_size=batch, workers=workers, seed=0)
    out["build_s"] = time.perf_counter() - built
    if backend == "dali" and not indexed:  # an older densessl screens inside build_loader, on every start
        out["screen_bytes_per_file"] = (read_bytes() - before) / len(files)
    first = time.perf_counter()
    next(iter(loader))
    out["first_batch_s"] = time.perf_counter() - first
    out["total_s"] = time.perf_counter() - start
    out["main_pss_mib"] = pss_mib(os.getpid())
    if backend == "torch":
        workers_now = children(os.getpid())
        out["workers_pss_mib"] = sum(pss_mib(p) for p in workers_now)
        dataset_paths = loader.engine.loader.dataset.files
        out.update(touched(dataset_paths, workers))
    out["files"] = len(files)
    out["list_mib"] = list_mib(files)
    return out


def list_mib(files) -> float:
    """Memory of the file list the loader holds: the index's arrays, or a list of strings (an older densessl)."""
    if hasattr(files, "blob"):
        return (files.blob.nbytes + files.offsets.nbytes + 8 * len(files)) / MIB  # + the int64 labels
    sample = [files[i] for i in range(0, len(files), max(1, len(files) // 1000))]
    return (8 + sum(map(sys.getsizeof, sample)) / len(sample)) * len(files) / MIB


def touched(paths, workers: int) -> dict:
    """PSS of ``workers`` processes forked from this one (DataLoader's start method on Linux) before and after
    each reads every path: what an epoch costs each worker in copied pages."""
    ctx = multiprocessing.get_context("fork")
    barrier, queue = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_touch_all, args=(paths, barrier, queue)) for _ in range(workers)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return {"forked_growth_per_worker_mib": sum(r[2] - r[0] for r in results) / workers,
            "forked_copied_per_worker_mib": sum(r[3] - r[1] for r in results) / workers}


def run_child(args, backend: str, index_dir: Path) -> dict:
    env = {**os.environ, "DENSESSL_INDEX_DIR": str(index_dir)}
    if args.package:
        env["PYTHONPATH"] = f"{args.package}{os.pathsep}{env.get('PYTHONPATH', '')}"
    # this file, not the module: an older densessl has no such module
    cmd = [sys.executable, __file__, "--child", backend, "--root", str(args.root),
           "--batch", str(args.batch), "--workers", str(args.workers)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{backend} measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


# --- the table -----------------------------------------------------------------------------------------------------

def row(name: str, r: dict, scale: float = 1.0) -> str:
    def cell(key, fmt="{:.1f}", scaled=True):
        return fmt.format(r[key] * (scale if scaled else 1)) if key in r else "-"
    return (f"| {name} | {cell('scan_s')} | {cell('screen_s')} | {cell('build_s')} | {cell('first_batch_s')} | "
            f"{cell('total_s')} | {cell('main_pss_mib', '{:,.0f}')} | {cell('workers_pss_mib', '{:,.0f}')} | "
            f"{cell('forked_growth_per_worker_mib', '{:,.1f}')} | {cell('forked_copied_per_worker_mib', '{:,.1f}')} | "
            f"{cell('screen_bytes_per_file', '{:,.0f}', False)} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=1_281_000)
    p.add_argument("--dir", type=Path, default=None, help="where the hard-link folder is made (default: a folder "
                   "in the temporary directory, named by --files)")
    p.add_argument("--backends", default="torch,dali")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--package", default="", help="a folder whose densessl the measurements import (before/after)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--root", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.root, args.batch, args.workers)), flush=True)
        return
    from .common import machine

    folder = args.dir or Path(tempfile.gettempdir()) / f"densessl-scale-{args.files}"
    args.root = make_folder(folder, args.files)
    rows = []
    with tempfile.TemporaryDirectory(prefix="densessl-scale-index-") as tmp:
        for backend in args.backends.split(","):
            index_dir = Path(tmp) / backend  # a fresh index folder: the first start builds everything
            for start in ("first", "second"):
                result = run_child(args, backend, index_dir)
                rows.append((f"{backend}, {start} start", result))
                print(f"{backend} {start} start: {result}", flush=True)
    n = rows[0][1]["files"]
    print(f"\nImageNet-scale start: {n:,} files (hard links, hot page cache), batch {args.batch}, "
          f"{args.workers} workers; {machine()}; densessl from {args.package or 'this checkout'}")
    print("| start | index s | screen s | build s | first batch s | total s | main PSS MiB | workers PSS MiB | "
          "forked worker PSS growth MiB (every path read) | of which copied MiB | screening bytes/file |")
    print("|" + " --- |" * 11)
    for name, r in rows:
        print(row(name, r))
    scale = IMAGENET_21K / n
    print(f"\nScaled linearly to {IMAGENET_21K:,} files (ImageNet-21k): the costs that grow with the file count")
    print("| start | index s | screening s (one rank) | file list in memory MiB (per rank) |")
    print("|" + " --- |" * 4)
    for name, r in rows:
        cells = [f"{r[k] * scale:,.0f}" if k in r else "-" for k in ("scan_s", "screen_s", "list_mib")]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("Worker growth is not scaled: a worker copies what it touches of the file list, so it is the file list's "
          "size for a list of strings and the fixed growth above for the index's arrays.")


if __name__ == "__main__":
    main()
