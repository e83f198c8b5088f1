"""A run folder and what it keeps besides checkpoints: which run it belongs to, the metrics log, the list of
skipped images, and the RNG states that make a resumed run draw what the unbroken run drew. (Data the run has to
generate or convert first is ``DataConfig.prepare``'s.)

A run folder belongs to one run. ``start`` is the one place that decides what a start in ``run.dir`` does: a new
or empty folder starts a run; a folder holding a run (its ``config.yaml`` or checkpoints) is continued only with
``run.resume`` (auto, or a path) and compatible settings, or started over with ``run.overwrite=true``, which drops
its checkpoints after the step this start resumes from; any other folder is not ours and is refused
(``pipeline.owned``). So a later ``run.resume=auto`` can only ever find this run's own checkpoints."""

from __future__ import annotations

import csv
import os
import random
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
import yaml

from densessl.model import checkpoint
from densessl.pipeline import owned

from .config import ConfigError, TrainConfig, different_training, parse, to_yaml

KIND = "run"  # the run folder's ``owned`` marker
# What a continued run may change besides where and how it reports (``different_training``): how long it trains.
RESUMABLE = ("optim.steps", "optim.epochs")


class RunFolderError(ConfigError):
    """``run.dir`` cannot hold this start; one line that says how to go on."""


def held_config(folder: Path) -> TrainConfig | None:
    """The configuration of the run ``folder`` holds (its ``config.yaml``), or None when it holds none."""
    held = folder / "config.yaml"
    if not held.is_file():
        return None
    try:
        return parse(["--config", str(held)])
    except (ConfigError, ValueError, OSError) as err:
        raise RunFolderError(f"run.dir={folder} holds a run whose config.yaml cannot be read ({err}); choose "
                             "another run.dir") from None


def _legacy(folder: Path) -> bool:
    """A run folder of a densessl from before markers (or one a user copied checkpoints into): it holds our
    checkpoint names (``checkpoints/step_<8 digits>.pt``), or a config.yaml with every section ``to_yaml`` writes
    that reads as our configuration (an empty or foreign one would parse as the defaults)."""
    if checkpoint.checkpoints(folder / "checkpoints"):
        return True
    try:
        held = yaml.safe_load((folder / "config.yaml").read_text())
        return (isinstance(held, dict) and {f.name for f in fields(TrainConfig)} <= set(held)
                and held_config(folder) is not None)
    except (OSError, yaml.YAMLError, RunFolderError):
        return False


def check(cfg: TrainConfig) -> list[Path]:
    """Whether ``cfg.run.dir`` may hold this start (module docstring), writing nothing: raises
    ``RunFolderError``, or returns the checkpoints the folder holds, oldest first."""
    run, folder = cfg.run, Path(cfg.run.dir)
    try:
        owned.check(folder, KIND, "run.dir", legacy=_legacy)
    except owned.NotOurs as err:
        raise RunFolderError(str(err)) from None
    steps = checkpoint.checkpoints(folder / "checkpoints")
    held = None if run.overwrite else held_config(folder)  # overwrite: whatever it held is dropped
    if (held is not None or steps) and not run.overwrite:
        what = f"checkpoints up to step {checkpoint.step_of(steps[-1])}" if steps else "its config.yaml"
        if not run.resume:
            raise RunFolderError(f"run.dir={folder} holds another run ({what}): continue it with run.resume=auto, "
                                 "start it over with run.overwrite=true, or choose another run.dir")
        differ = different_training(held, cfg, ignore=RESUMABLE) if held is not None else []
        if differ:
            raise RunFolderError(f"run.dir={folder} holds a run trained with other settings ({', '.join(differ)}): "
                                 "continue it with its own, start it over with run.overwrite=true, or choose "
                                 "another run.dir")
    return steps


def start(cfg: TrainConfig) -> tuple[dict, Path] | None:
    """Claim ``cfg.run.dir`` for this start (rank 0 only; ``check``) and write its ``config.yaml``: returns the
    checkpoint to resume from and its path, or None for a start from step 0."""
    run, steps = cfg.run, check(cfg)
    folder = owned.claim(run.dir, KIND, "run.dir", legacy=_legacy)
    ckpt_dir = folder / "checkpoints"
    if run.resume == "auto":
        resumed = checkpoint.load_latest(ckpt_dir)
    else:
        resumed = (checkpoint.read(run.resume), Path(run.resume)) if run.resume else None
    step = resumed[0]["global_step"] if resumed else 0
    later = [p for p in steps if checkpoint.step_of(p) > step]
    if later and run.resume != "auto":  # auto: the later ones are the unreadable ones it fell back from
        if not run.overwrite:
            raise RunFolderError(f"run.dir={folder} holds step {checkpoint.step_of(later[-1])}, after the resumed "
                                 f"step {step}, which a later run.resume=auto would take: run.overwrite=true drops "
                                 f"the steps after {step}")
        for path in later:  # ours: a step_*.pt in our run folder's checkpoints
            path.unlink()
        print(f"run.overwrite: dropped {len(later)} checkpoint(s) after step {step} in {ckpt_dir}", flush=True)
    tmp = folder / f".config.yaml.tmp-{os.getpid()}"
    tmp.write_text(to_yaml(cfg))
    os.replace(tmp, folder / "config.yaml")
    return resumed


class MetricsLog:
    """metrics.csv in the run folder, appended: a start at ``resume_step`` keeps every row up to that step and
    drops the ones after it (steps that are trained again), rewriting the file atomically."""

    FIELDS = ("step", "epoch", "loss", "lr", "images_per_s", "data_wait", "loss_global", "loss_dense")

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        rows = []
        if path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, self.FIELDS, extrasaction="ignore")

    def write(self, row: dict) -> None:
        self.writer.writerow(row)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class SkippedImages:
    """Unreadable files the loader replaced (``skipped.txt``: path, reason); the run aborts past ``limit``."""

    def __init__(self, path: Path, limit: int):
        self.path, self.limit, self.size, self.files = path, limit, 0, set()

    def over_limit(self) -> bool:
        size = self.path.stat().st_size if self.path.exists() else 0
        if size != self.size:  # only re-read when workers appended
            self.size = size
            self.files = {line.split("\t")[0] for line in self.path.read_text().splitlines() if line}
        return len(self.files) > self.limit


def rng_state(augment_gen: torch.Generator) -> dict:
    """This process's random states: torch (CPU and CUDA), numpy, Python and the augmentation generator."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "augment": augment_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, augment_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    augment_gen.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
