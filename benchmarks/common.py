"""Timing helpers shared by the benchmarks: warm-up excluded, several repetitions, median and spread."""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass

import psutil
import torch


def cpu_seconds() -> float:
    """CPU time of this process and its (live and reaped) child processes: workers included."""
    me = psutil.Process()
    t = me.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in me.children(recursive=True):
        try:
            c = child.cpu_times()
            total += c.user + c.system
        except psutil.NoSuchProcess:
            pass
    return total


@dataclass
class Rate:
    name: str
    runs: list[float]  # items/s, one per repetition
    unit: str = "pairs/s"
    cores: float = float("nan")  # CPU cores busy on average during the timed runs

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    def row(self, reference: float | None = None) -> str:
        spread = f"{min(self.runs):,.0f}-{max(self.runs):,.0f}"
        ratio = f"{self.median / reference:5.2f}x" if reference else ""
        return f"{self.name:44s} {self.median:12,.0f} {self.unit:8s} [{spread:>17s}] {ratio}"


def time_loader(name: str, loader, epochs: int, reps: int, count=lambda batch: batch["index"].shape[0]) -> Rate:
    """Items/s of a loader that starts its next epoch each time it is iterated (view-pair loaders and torch
    DataLoaders do): one warm-up epoch (worker start-up, JIT), then ``reps`` timed runs of ``epochs`` epochs."""

    def run_epochs(n):
        return sum(count(batch) for _ in range(n) for batch in loader)

    run_epochs(1)
    runs, cpu, wall = [], cpu_seconds(), time.perf_counter()
    for _ in range(reps):
        start = time.perf_counter()
        items = run_epochs(epochs)
        runs.append(items / (time.perf_counter() - start))
    return Rate(name, runs, cores=(cpu_seconds() - cpu) / (time.perf_counter() - wall))


def machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}"
