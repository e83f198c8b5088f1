"""Checkpoint files: atomic writes, discovery, safe reading, the model rebuilt from what a checkpoint says it is,
and the encoders of other projects' checkpoints.

Written to a temporary file in the same folder, fsynced, then renamed over (rename is atomic on POSIX), and the
folder fsynced so the rename itself survives a power cut. Every checkpoint holds ``model_config`` (the model
section and the method's settings, ``builder.model_config``), so training, evaluation and export rebuild the same
model from the file alone.

Every file is read by ``load_file`` and nothing else: torch's weights-only unpickler, which builds tensors, plain
Python containers and numbers, and the types in ``SAFE_GLOBALS`` (numpy arrays, ``argparse.Namespace``), and
refuses any other type before building it (a ``.safetensors`` file holds tensors only and is read by its own
library). A shared checkpoint is someone else's pickle, and a pickle may name any function to call.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import socket
import warnings
from pathlib import Path

import numpy as np
import torch

from .builder import MoCo, configs_from_checkpoint

_NAME = re.compile(r"^step_(\d{8})\.pt$")


def save(state: dict, folder: str | Path, step: int, keep: int = 2) -> Path:
    """Write ``state`` as ``folder/step_<step>.pt`` and keep the newest ``keep`` (>= 1) checkpoints up to ``step``:
    a checkpoint of a later step is never pruned for this one (the run folder's rules, ``train.run_folder``, keep
    other runs' files out of ``folder``). Temporary files of a writer that died on this host are removed; another
    live writer's are left alone."""
    if keep < 1:
        raise ValueError(f"keep={keep}: at least the checkpoint just written must be kept")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step:08d}.pt"
    tmp = folder / f".{final.name}.tmp-{_HOST}-{os.getpid()}"
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
    upto = [p for p in checkpoints(folder) if step_of(p) <= step]
    for old in upto[:-keep]:
        old.unlink(missing_ok=True)
    for stale in folder.glob(f".step_*.pt.tmp-{_HOST}-*"):  # left by a process of this host killed mid-write
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)
    return final


_HOST = socket.gethostname().replace("-", "_")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def step_of(path: Path) -> int:
    """The step a checkpoint file's name says (``step_00000100.pt``: 100)."""
    return int(_NAME.match(path.name).group(1))


def checkpoints(folder: str | Path) -> list[Path]:
    """Checkpoint files in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


class CheckpointError(ValueError):
    """A file that cannot be read as a checkpoint; its message is one line that names the file."""


class RefusedCheckpoint(CheckpointError):
    """A file whose pickle names a type or function that weights-only loading does not build."""


# What unpickling a plain numpy array needs: our training checkpoints hold numpy's RNG state (a uint32 array)
# beside the weights. Building these runs no code of the file's choosing; nor does an ``argparse.Namespace`` (a bag
# of attributes), which DINO's and timm's training checkpoints hold as their ``args``.
SAFE_GLOBALS = [(np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct, np.ndarray, np.dtype,
                type(np.dtype(np.uint32)), argparse.Namespace]
# How torch's weights-only unpickler names what it refused: a global (a function, a class), or an instance of an
# unlisted class. Its other errors ("Unsupported operand") mean the bytes are no pickle of ours at all.
_REFUSED = re.compile(r"GLOBAL (\S+)|allowlisted.*? but got (.+)")


def load_file(path: str | Path, map_location="cpu"):
    """The contents of ``path``, weights only (see the module's docstring).

    Raises ``RefusedCheckpoint`` naming the first type the file asked for and was refused, and ``CheckpointError``
    for a file that is truncated, corrupt or not a torch file at all."""
    if str(path).endswith(".safetensors"):  # timm's weights on the Hugging Face hub: tensors only, by design
        from safetensors.torch import load_file as load_safetensors
        try:
            return load_safetensors(path, device=str(map_location))
        except (OSError, MemoryError):
            raise
        except Exception as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({type(err).__name__}: "
                                  f"{_detail(err)})") from None
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = _REFUSED.search(str(err))
        if found:
            raise RefusedCheckpoint(f"{path}: refused {found.group(1) or found.group(2)}: checkpoints are loaded "
                                    "weights only (tensors, plain Python values, numpy arrays), so that a file "
                                    "cannot run code") from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({_detail(err)})") from None
    except (OSError, MemoryError):  # the machine failed, not the file: not a reason to take an older step
        raise
    except Exception as err:  # the zip reader's RuntimeError, a KeyError from a file that is not a pickle, ...
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {_detail(err)})") \
            from None


def _detail(err: Exception) -> str:
    """The informative line of a loading error: torch wraps the unpickler's own in paragraphs of advice."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    ours = [line for line in lines if not line.startswith(("Weights only load failed", "Please file", "Check the"))]
    return (ours or lines or ["no message"])[0].split(". ")[0]  # its first sentence: the rest is advice


def load_latest(folder: str | Path, map_location="cpu") -> tuple[dict, Path] | None:
    """The newest readable checkpoint, or None when there is none. A truncated or corrupt newest file falls back
    to the one before it (a crash mid-write); a refused one raises, since it was not written by a crash, and so
    does an error of the machine (``OSError``, ``MemoryError``: ``load_file``), which an older file would not
    mend."""
    for path in reversed(checkpoints(folder)):
        try:
            return load_file(path, map_location), path
        except RefusedCheckpoint:
            raise
        except CheckpointError as err:
            warnings.warn(f"{err}; trying the previous checkpoint")
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
    state = load_file(path)
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a densessl training checkpoint (no 'model')")
    if "model_config" not in state:
        raise CheckpointError(f"{path} has no 'model_config': it was written by an older densessl; export its encoder "
                         "with that version, or load it as weights (torchvision:/mocov2:/timm:)")
    return state


def load_model(path: str | Path) -> MoCo:
    """The model a checkpoint holds, rebuilt from its ``model_config``, in eval mode on the CPU."""
    state = read(path)
    model = MoCo(*configs_from_checkpoint(state["model_config"]))
    model.load_state_dict(state["model"])
    return model.eval()


# Where the query / online encoder sits in the checkpoints of the projects we read, most specific first: ours
# (``encoder_q.encoder.net``), DenseCL / OpenSelfSup (``encoder_q.0``: backbone then neck), MoCo v1/v2
# (``encoder_q``), MoCo v3 (``base_encoder``), mmselfsup (``backbone``), our encoder alone (``encoder.net``, ``net``).
# A checkpoint with none of them is a plain torchvision state dict.
ENCODER_PREFIXES = ("encoder_q.encoder.net.", "encoder_q.0.", "encoder_q.", "base_encoder.", "backbone.",
                    "encoder.net.", "net.")


def read_encoder_state(path: str | Path) -> dict:
    """The query encoder of a MoCo v1/v2/v3, DenseCL, torchvision, timm, DINO, DINOv2 or densessl checkpoint as a
    plain torchvision ResNet or timm ViT state dict, without a ResNet's classifier (``fc.*``).

    The keys are unwrapped from ``state_dict``, ``model`` or ``teacher`` (a DINO training checkpoint: its
    evaluations read the teacher) and from DDP's ``module.``; then only the keys of the first
    ``ENCODER_PREFIXES`` entry found are kept (a MoCo checkpoint also holds the momentum encoder and the queue,
    which are not the encoder's)."""
    state = load_file(path)
    for wrapper in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path} holds no state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    prefix = next((p for p in ENCODER_PREFIXES if any(k.startswith(p) for k in state)), "")
    return {k[len(prefix):]: v for k, v in state.items()
            if k.startswith(prefix) and not k[len(prefix):].startswith("fc.") and torch.is_tensor(v)}


def load_encoder_weights(encoder, path: str | Path) -> None:
    """Load ``read_encoder_state(path)`` into ``encoder`` (a ``network.build_encoder`` module), all of it."""
    encoder.load_encoder_state(read_encoder_state(path), str(path))
