"""One writer while the others wait: a lock file made with ``O_EXCL`` (atomic on local and network file systems),
holding its writer's host and pid and kept fresh while it works, so that a lock left by a writer that died is
taken over (on the same machine: its pid is gone; elsewhere: not touched for ``LOCK_FRESH_S``)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path

LOCK_FRESH_S = 120.0  # a lock not touched for this long was left by a writer that died on another machine


@contextlib.contextmanager
def one_writer(lock: Path, what: str = "the data index"):
    """Yields True in the one process that holds ``lock`` (kept fresh by a thread while it works), after which the
    lock is removed; in every other process, waits until the lock is gone and yields False. A lock left by a
    dead process (on this machine: its pid is gone; elsewhere: not touched for ``LOCK_FRESH_S``) is taken over."""
    if not _take(lock):
        _wait(lock, what)
        yield False
        return
    done = threading.Event()

    def keep_fresh():
        while not done.wait(10.0):
            with contextlib.suppress(OSError):
                os.utime(lock)

    thread = threading.Thread(target=keep_fresh, daemon=True)
    thread.start()
    try:
        yield True
    finally:
        done.set()
        thread.join()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)


def _take(lock: Path) -> bool:
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not _abandoned(lock):
                return False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
        return True
    return False


def _abandoned(lock: Path) -> bool:
    try:
        host, pid = lock.read_text().split()
        age = time.time() - os.stat(lock).st_mtime
    except (OSError, ValueError):
        return False  # being written or just removed: look again later
    if host == socket.gethostname():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    return age > LOCK_FRESH_S


def _wait(lock: Path, what: str) -> None:
    start = last = time.monotonic()
    while lock.exists() and not _abandoned(lock):
        time.sleep(0.2)
        if time.monotonic() - last > 30:
            last = time.monotonic()
            with contextlib.suppress(OSError):
                print(f"waiting {last - start:.0f} s for {lock.read_text().strip()} to write {what}", flush=True)
