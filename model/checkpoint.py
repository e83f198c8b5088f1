"""Training checkpoints: atomic writes, discovery, and the model rebuilt from what a checkpoint says it is.

Written to a temporary file in the same folder, fsynced, then renamed over (rename is atomic on POSIX), and the
folder fsynced so the rename itself survives a power cut. Loading falls back to an older checkpoint when the
newest cannot be read. Every checkpoint holds ``model_config`` (the ``MoCoConfig`` fields), so training,
evaluation and export rebuild the same model from the file alone.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch

from .builder import MoCo, MoCoConfig

_NAME = re.compile(r"^step_(\d{8})\.pt$")


def save(state: dict, folder: str | Path, step: int, keep: int = 2) -> Path:
    """Write ``state`` as ``folder/step_<step>.pt`` and keep the newest ``keep`` (>= 1) checkpoints."""
    if keep < 1:
        raise ValueError(f"keep={keep}: at least the checkpoint just written must be kept")
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


def find(path: str | Path) -> Path:
    """A checkpoint file, or a run folder's newest checkpoint (in ``RUN/checkpoints`` or the folder itself)."""
    path = Path(path)
    if path.is_dir():
        found = checkpoints(path / "checkpoints") or checkpoints(path)
        if not found:
            raise FileNotFoundError(f"no checkpoints in {path}")
        return found[-1]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint or run folder")
    return path


def run_and_step(path: str | Path) -> str:
    """A checkpoint's name for tables: its run folder and file stem (``vader/step_00000200``)."""
    path = Path(path)
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return f"{run.name}/{path.stem}"


def read(path: str | Path) -> dict:
    """The contents of one of our training checkpoints (a file or a run folder's newest), checked."""
    path = find(path)
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path} is not a densessl training checkpoint (no 'model')")
    if "model_config" not in state:
        raise ValueError(f"{path} has no 'model_config': it was written by an older densessl; export its encoder "
                         "with that version, or load it as weights (torchvision:/mocov2:)")
    return state


def load_model(path: str | Path) -> MoCo:
    """The model a checkpoint holds, rebuilt from its ``model_config``, in eval mode on the CPU."""
    state = read(path)
    model = MoCo(MoCoConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    return model.eval()
