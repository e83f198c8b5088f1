"""Timing helpers shared by the benchmarks: warm-up excluded, several repetitions, median and spread."""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class Rate:
    name: str
    runs: list[float]  # items/s, one per repetition
    unit: str = "pairs/s"

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    def row(self, reference: float | None = None) -> str:
        spread = f"{min(self.runs):,.0f}-{max(self.runs):,.0f}"
        ratio = f"{self.median / reference:5.2f}x" if reference else ""
        return f"{self.name:44s} {self.median:12,.0f} {self.unit:8s} [{spread:>17s}] {ratio}"


def time_loader(name: str, loader, epochs: int, reps: int, count=lambda batch: batch["index"].shape[0]) -> Rate:
    """Items/s of a re-iterable loader: one warm-up epoch (worker start-up, JIT), then ``reps`` timed runs."""
    sampler = getattr(loader, "sampler", None)
    epoch = 0

    def run_epochs(n):
        nonlocal epoch
        items = 0
        for _ in range(n):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            epoch += 1
            for batch in loader:
                items += count(batch)
        return items

    run_epochs(1)
    runs = []
    for _ in range(reps):
        start = time.perf_counter()
        items = run_epochs(epochs)
        runs.append(items / (time.perf_counter() - start))
    return Rate(name, runs)


def machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {gpu}"
