"""Distributed plumbing: process-group set-up, rank agreement, gathering, heartbeats and the stop flag.

Every function works on one process too (``world == 1``), so the trainer has no single-process special cases.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


def resolve_device(device: str = "auto") -> torch.device:
    """The device type a ``device`` setting names: ``auto`` (the GPU if there is one), ``cuda`` or ``cpu``; an
    unknown name, or ``cuda`` where torch sees no GPU, is an error that says what to use instead."""
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device={device!r}: choose auto, cuda or cpu")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise ValueError("device=cuda, but torch sees no CUDA device here: use device=auto or device=cpu")
    return torch.device("cuda" if cuda else "cpu")


def setup(device: str = "auto", timeout_s: float = 600) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device) from torchrun / Slurm variables; joins the process group (NCCL on
    GPU, gloo on CPU) when ``WORLD_SIZE`` > 1. ``device``: as ``resolve_device``'s, a GPU being the one of
    ``LOCAL_RANK``."""
    cuda = resolve_device(device).type == "cuda"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    here = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(here)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", init_method="env://", timeout=timedelta(seconds=timeout_s))
    return (dist.get_rank() if world > 1 else 0), world, here


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def agree(flags: list[bool], world: int, device: torch.device) -> list[bool]:
    """Any rank's flag, on every rank (one small all-reduce): ranks see a signal, a bad loss or the bad-image
    cap at different moments, and must act on the same step or the next collective would hang."""
    if world == 1:
        return flags
    t = torch.tensor([int(f) for f in flags], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def gather_objects(obj, world: int) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


_STOP = threading.Event()


def request_stop(*_) -> None:
    """Ask the running training to finish its step, checkpoint and return (a signal handler: preemption,
    time-out). The trainer consumes the request when it stops, so a later run in the same process starts clean."""
    _STOP.set()


def stop_requested() -> bool:
    return _STOP.is_set()


def clear_stop() -> None:
    _STOP.clear()


class Heartbeat:
    """Each rank's background thread writes its current step and the time every second
    (``run_dir/heartbeat/rank<r>``), so a collective that fails or times out can name the rank at fault: a
    frozen, crashed or killed process stops beating; a rank stuck in its own work (data, a hung kernel) beats
    but falls behind the step the others wait in."""

    INTERVAL_S = 1.0

    def __init__(self, run_dir: Path, rank: int, world: int):
        self.folder, self.rank, self.world, self.step = run_dir / "heartbeat", rank, world, 0
        self.stopped = threading.Event()
        if world > 1:
            self.folder.mkdir(parents=True, exist_ok=True)
            threading.Thread(target=self._run, daemon=True, name="heartbeat").start()

    def _run(self) -> None:
        path = self.folder / f"rank{self.rank}"
        while not self.stopped.is_set():
            path.with_suffix(".tmp").write_text(f"{self.step} {time.time():.3f}")
            os.replace(path.with_suffix(".tmp"), path)  # readers never see a half-written beat
            self.stopped.wait(self.INTERVAL_S)

    def beat(self, step: int) -> None:
        self.step = step

    def diagnosis(self) -> str:
        seen = {}
        for r in range(self.world):
            f = self.folder / f"rank{r}"
            step, stamp = f.read_text().split() if f.exists() else (0, 0)
            seen[r] = (int(step), time.time() - float(stamp))
        silent = [f"rank {r} silent for {age:.0f} s (frozen, crashed or killed; last finished step {step})"
                  for r, (step, age) in seen.items() if age > 5 * self.INTERVAL_S]
        ahead = max(step for step, _ in seen.values())
        behind = [f"rank {r} last finished step {step} while others reached {ahead}"
                  for r, (step, age) in seen.items() if step < ahead and age <= 5 * self.INTERVAL_S]
        return "; ".join(silent + behind) or f"no rank fell silent or behind (all at step {ahead})"

    @contextlib.contextmanager
    def names_stuck_ranks(self):
        """Turn a collective's time-out or peer failure into an error that names the ranks at fault; stop
        beating when the block ends."""
        try:
            yield
        except (RuntimeError, dist.DistError) as err:  # gloo and NCCL time-outs and peer failures
            if self.world == 1 or not any(w in str(err).lower() for w in ("timeout", "timed out", "connection",
                                                                            "closed", "reset", "peer")):
                raise
            first = (str(err).splitlines() or ["?"])[0]
            raise RuntimeError(f"a collective operation failed on rank {self.rank} ({first}): "
                               f"{self.diagnosis()}; heartbeats in {self.folder}") from err
        finally:
            self.stopped.set()
