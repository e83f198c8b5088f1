"""Atomic checkpoints: a crash at any moment leaves the previous checkpoint whole.

Written to a temporary file in the same folder, fsynced, then renamed over (rename is atomic on POSIX), and the
folder fsynced so the rename itself survives a power cut. Loading falls back to an older checkpoint when the
newest cannot be read.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch

_NAME = re.compile(r"^step_(\d{8})\.pt$")


def save(state: dict, folder: str | Path, step: int, keep: int = 2) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step:08d}.pt"
    tmp = folder / f".{final.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for old in checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    for stale in folder.glob(".step_*.pt.tmp-*"):  # left by a process killed mid-write
        if not stale.name.endswith(f"-{os.getpid()}"):
            stale.unlink(missing_ok=True)
    return final


def checkpoints(folder: str | Path) -> list[Path]:
    """Checkpoint files in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def load_latest(folder: str | Path, map_location="cpu") -> tuple[dict, Path] | None:
    """The newest readable checkpoint, or None when there is none."""
    for path in reversed(checkpoints(folder)):
        try:
            return torch.load(path, map_location=map_location, weights_only=False), path
        except Exception as err:  # a truncated or corrupt file: fall back to the one before
            warnings.warn(f"checkpoint {path} is unreadable ({err}); trying the previous one")
    return None
