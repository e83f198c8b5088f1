"""One progress display for long work (data generation, file screening, feature extraction): a tqdm bar in a
terminal; in a log file (stderr is not a terminal: Slurm's logs, ``make demo > log``) a plain line every
``every_s`` seconds and one at the end, never a carriage return."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

from tqdm import tqdm


def progress(items: Iterable, desc: str, total: int | None = None, unit: str = "it", enabled: bool = True,
             every_s: float = 30.0) -> Iterator:
    """Yield ``items``, showing how far it got (see the module docstring)."""
    if not enabled:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    if sys.stderr.isatty():
        yield from tqdm(items, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)
        return
    of = f"/{total}" if total is not None else ""
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every_s:
            print(f"{desc}: {done}{of} {unit}", file=sys.stderr, flush=True)
            last = now
    print(f"{desc}: {done}{of} {unit} in {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)
