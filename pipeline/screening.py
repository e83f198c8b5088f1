"""Screening: which files a compiled decoder (DALI's) can read, judged from a few bytes of each, once per data set.

DALI's decoder aborts the whole pipeline on a broken file, so its loader keeps only the files that pass
``screen_file``: not empty, an image header that libjpeg / PIL accepts, a size under ``MAX_PIXELS``, and an end
marker (a truncated file has none). A JPEG costs its first ``HEAD`` bytes (the segments up to the start of scan;
large metadata segments such as EXIF are skipped, not read) and its last ``TAIL`` bytes.

``screen_index`` screens a cached ``DataIndex`` once: the files are cut into chunks of ``CHUNK``, each
process (rank) takes the chunks nobody has taken yet, starting at its own share, and writes each chunk's verdicts
next to the index; once every chunk is there, the verdicts are joined into the index, where every later start,
rank and requeue finds them.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import simplejpeg

from .folder import MAX_PIXELS, BadImage, _check_size, _open
from .index import BAD, READABLE, DataIndex, read_index, write_index
from .one_writer import one_writer
from .progress import progress

CHUNK = 20_000  # files per screening chunk: the unit the ranks share out
HEAD, TAIL = 2048, 4096  # bytes read first from each end of a JPEG
OLD_HEAD = 65536  # what any other file (PNG, an unusual JPEG) reads from its start
_SKIPPED = {*range(0xE1, 0xEE), 0xEF, 0xFE}  # APP1-APP13, APP15, COM: metadata libjpeg does not need for a header


def screen_file(path: str, max_pixels: int = MAX_PIXELS) -> str | None:
    """Why ``path`` cannot be a training image, from its header and its last bytes (no decode), or None.

    Catches empty and non-image files, decompression bombs and truncated JPEG/PNG files (no end marker): what
    makes a decoder inside a compiled pipeline (DALI) abort."""
    return _screen(path, max_pixels)[0]


def _screen(path: str, max_pixels: int = MAX_PIXELS) -> tuple[str | None, int, int]:
    """``(reason or None, size, mtime_ns)`` of one file."""
    try:
        with open(path, "rb", buffering=0) as f:  # unbuffered: read what is asked, not 8 KB blocks
            st = os.fstat(f.fileno())
            if st.st_size == 0:
                return "empty file", 0, st.st_mtime_ns
            return _judge(f, st.st_size, max_pixels), st.st_size, st.st_mtime_ns
    except OSError as err:
        return f"unreadable header: {err}", 0, 0


def _judge(f, size: int, max_pixels: int) -> str | None:
    try:
        head = f.read(HEAD)
        tail = _read_tail(f, size, head)
        if head[:2] == b"\xff\xd8":
            try:
                h, w, _, _ = simplejpeg.decode_jpeg_header(_jpeg_header(f, head, size))
            except Exception:  # noqa: BLE001 - the unusual cases: judged as before, from the first 64 KB
                head = _read_head(f, size, head)
                h, w, _, _ = simplejpeg.decode_jpeg_header(head if size <= OLD_HEAD else head + tail)
            if b"\xff\xd9" not in tail:
                return "truncated JPEG (no end-of-image marker)"
        else:
            head = _read_head(f, size, head)
            with _open(head) as im:
                w, h = im.size
            if head[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in tail:
                return "truncated PNG (no IEND chunk)"
        _check_size(h, w, max_pixels)
    except BadImage as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - any unreadable header is a bad file
        return f"unreadable header: {err}"
    return None


def _read_tail(f, size: int, head: bytes) -> bytes:
    start = max(0, size - TAIL)
    if size <= len(head):
        return head[start:]
    if start < len(head):
        return head[start:] + f.read()
    f.seek(start)
    return f.read()


def _read_head(f, size: int, head: bytes) -> bytes:
    if len(head) >= min(size, OLD_HEAD):
        return head[:OLD_HEAD]
    f.seek(0)
    return f.read(OLD_HEAD)


def _jpeg_header(f, head: bytes, size: int) -> bytes:
    """The start-of-image marker and every segment up to the start of scan except large metadata (``_SKIPPED``):
    what libjpeg reads for a header. Segments past ``head`` are read where they lie; an unusual structure
    raises (the caller then reads the first 64 KB, as screening always did)."""
    parts, pos, known = [b"\xff\xd8"], 2, len(head)
    while pos + 4 <= size:
        if pos + 4 <= known:
            marker = head[pos:pos + 4]
        else:
            f.seek(pos)
            marker = f.read(4)
        kind = marker[1] if len(marker) == 4 and marker[0] == 0xFF else -1
        if kind in (-1, 0xFF, 0xD8, 0xD9) or 0xD0 <= kind <= 0xD7:
            raise ValueError("unusual JPEG marker structure")
        end = pos + 2 + ((marker[2] << 8) | marker[3])
        if end < pos + 4:
            raise ValueError("bad JPEG segment length")
        if kind not in _SKIPPED:
            if end <= known:
                segment = head[pos:end]
            else:
                f.seek(pos)
                segment = f.read(end - pos)
                if len(segment) < end - pos:
                    raise ValueError("JPEG segment cut short")
            parts.append(segment)
            if kind == 0xDA:
                return b"".join(parts)
        pos = end
    raise ValueError("no start of scan")


BLOCK = 2048  # files per task of a screening process


def _screen_range(paths, start: int, stop: int, pool=None, threads: int = 2, show: bool = False):
    """``(verdicts, sizes, mtimes, reasons)`` of ``paths[start:stop]``, in blocks of ``BLOCK`` files shared by the
    processes of ``pool`` (``_screening_pool``; None: this process), each reading with ``threads`` threads: on a
    hot page cache more threads only contend for the interpreter (8 were 1.3x slower than 1 in a one-off run), while on a
    network file system a second read in flight hides some of each open's latency."""
    blocks = [(a, min(stop, a + BLOCK), threads) for a in range(start, stop, BLOCK)]
    if pool is not None:
        parts = list(progress(pool.imap(_screen_block, blocks), "screening files", len(blocks), f"x{BLOCK} files",
                              enabled=show))
    else:
        global _PATHS
        _PATHS = paths
        try:
            parts = [_screen_block(b) for b in blocks]
        finally:
            _PATHS = None
    results = [r for part in parts for r in part]
    verdicts = np.array([BAD if r else READABLE for r, _, _ in results], np.uint8)
    sizes = np.array([s for _, s, _ in results], np.int64)
    mtimes = np.array([m for _, _, m in results], np.int64)
    return verdicts, sizes, mtimes, {start + k: r for k, (r, _, _) in enumerate(results) if r}


@contextlib.contextmanager
def _screening_pool(paths, files: int):
    """Forked processes, one per CPU of this process (the per-file work is Python: threads alone would share
    one core), which inherit ``paths`` rather than receive them; None for a few files or a single CPU."""
    global _PATHS
    processes = min(len(os.sched_getaffinity(0)), -(-files // BLOCK))
    if processes < 2:
        yield None
        return
    import multiprocessing

    _PATHS = paths
    try:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            yield pool
    finally:
        _PATHS = None


_PATHS = None


def _screen_block(block: tuple[int, int, int]) -> list:
    start, stop, threads = block
    paths = _PATHS
    step = -(-(stop - start) // threads)
    with ThreadPoolExecutor(threads) as pool:
        parts = pool.map(lambda a: [_screen(paths[i]) for i in range(a, min(stop, a + step))],
                         range(start, stop, step))
        return [r for part in parts for r in part]


def report(paths, reasons: dict[int, str], skip_log: str | None) -> None:
    """Warn about the first bad files and append every one to ``skip_log`` (path, reason)."""
    bad = sorted(reasons.items())
    for i, reason in bad[:20]:
        warnings.warn(f"skipping {paths[i]}: {reason}", stacklevel=3)
    if bad and skip_log:
        with open(skip_log, "a") as log:
            log.writelines(f"{paths[i]}\t{reason}\n" for i, reason in bad)


def screen_index(index: DataIndex, skip_log: str | None = None, rank: int = 0,
                 world_size: int = 1) -> tuple[DataIndex, np.ndarray]:
    """``(index with its verdicts, indices of the readable files)``: the verdicts cached in ``index`` when it has
    them; else each process screens the chunks nobody has taken (starting at ``rank``'s share of ``world_size``),
    waits for the others' chunks, and the verdicts are joined and written into the cached index. Rank 0 reports
    the bad files (``report``)."""
    if not index.screened:
        if index.file is None:
            with _screening_pool(index.paths, len(index)) as pool:
                verdicts, sizes, mtimes, reasons = _screen_range(index.paths, 0, len(index), pool,
                                                                 show=len(index) >= 50_000)
            index = replace(index, verdicts=verdicts, sizes=sizes, mtimes=mtimes, reasons=reasons)
        else:
            index = _screen_shared(index, rank, world_size)
    if rank == 0:
        report(index.paths, index.reasons, skip_log)
    return index, np.flatnonzero(index.verdicts == READABLE)


def _screen_shared(index: DataIndex, rank: int, world_size: int) -> DataIndex:
    """Screen the chunks no process has taken, wait for the others', join them. The chunks live in a folder
    beside the index until they are joined into it; a process that finds the folder gone reads the index."""
    if (written := _screened_by_another(index)) is not None:
        return written
    folder = index.file.with_name(f"{index.file.name}.screen-{index.build}")
    folder.mkdir(exist_ok=True)
    n = -(-len(index) // CHUNK)
    first = rank * n // world_size
    pending = [(first + k) % n for k in range(n)]
    start, done = time.monotonic(), 0
    try:
        with _screening_pool(index.paths, len(index)) as pool:
            while pending:
                for c in list(pending):
                    part = folder / f"{c:06d}.npz"
                    if not part.exists():
                        with one_writer(folder / f"{c:06d}.lock", "its screening chunk") as writing:
                            if writing and not part.exists():
                                _write_chunk(index, c, part, pool)
                                done += 1
                                print(f"screened chunk {c + 1} of {n} ({done} by this process, "
                                      f"{time.monotonic() - start:.0f} s)", flush=True)
                    if part.exists():
                        pending.remove(c)
        return _join(index, folder, n)
    except FileNotFoundError:  # another process joined the chunks and removed them
        if (written := _screened_by_another(index)) is None:
            raise
        return written


def _screened_by_another(index: DataIndex) -> DataIndex | None:
    written = read_index(index.file)
    return written if written.build == index.build and written.screened else None


def _write_chunk(index: DataIndex, c: int, part: Path, pool) -> None:
    start, stop = c * CHUNK, min(len(index), (c + 1) * CHUNK)
    verdicts, sizes, mtimes, reasons = _screen_range(index.paths, start, stop, pool)
    tmp = part.with_name(f"{part.stem}.tmp-{os.getpid()}.npz")
    np.savez(tmp, verdicts=verdicts, sizes=sizes, mtimes=mtimes, bad=np.array(list(reasons), np.int64),
             reasons=np.array(list(reasons.values()), dtype=str))
    os.replace(tmp, part)


def _join(index: DataIndex, folder: Path, n: int) -> DataIndex:
    """The chunks joined into the index, written once (by whoever takes the index's lock first), and their
    folder removed."""
    parts = [np.load(folder / f"{c:06d}.npz") for c in range(n)]
    reasons = {}
    for p in parts:
        reasons.update(zip(p["bad"].tolist(), p["reasons"].tolist()))
    joined = replace(index, reasons=reasons, **{k: np.concatenate([p[k] for p in parts])
                                                for k in ("verdicts", "sizes", "mtimes")})
    with one_writer(index.file.with_name(index.file.name + ".lock")) as writing:
        if writing:
            current = read_index(index.file)
            if current.build == index.build and not current.screened:
                write_index(joined, index.file)
            for entry in folder.iterdir():
                with contextlib.suppress(OSError):
                    entry.unlink()
            with contextlib.suppress(OSError):
                folder.rmdir()
    return joined
