"""What a run keeps in its folder besides checkpoints: the metrics log, the list of skipped images, and the RNG
states that make a resumed run draw what the unbroken run drew. (Data the run has to generate or convert first is
``DataConfig.prepare``'s.)"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import torch



class MetricsLog:
    """metrics.csv in the run folder; on resume, rows after the checkpoint's step are dropped."""

    FIELDS = ("step", "epoch", "loss", "lr", "images_per_s", "data_wait", "loss_global", "loss_dense")

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        rows = []
        if path.exists() and resume_step > 0:
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, self.FIELDS, extrasaction="ignore")
        self.writer.writeheader()
        self.writer.writerows(rows)

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
