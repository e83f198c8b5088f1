"""Training-step throughput: forward+backward pairs/s of the model alone (synthetic tensors already on the
device) and fed by each loader backend, with the fraction of step time spent waiting for data.

    python -m benchmarks.train_step [--arch resnet50] [--size 224] [--batch 8] [--steps 5] [--data synthetic]
                                    [--backends torch,dali,ffcv] [--workers 2]

DALI decodes on the GPU (``mixed``) when there is one; FFCV reads a .beton written beside the data.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from pipeline import PairSpec, build_loader
from train.config import TrainConfig
from train.trainer import Trainer, build_model

from .common import machine
from .loader import DATA_HELP, backend_data, resolve_data


def synthetic_batches(batch: int, size: int, k: int = 32):
    grid = size // 4
    views = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    matches = torch.randint(0, grid * grid, (batch, k, 2))
    xy = torch.rand(batch, k, 2) * grid
    one = {"view1": views, "view2": views.flip(3), "matches": matches, "match_xy2": xy,
           "index": torch.arange(batch)}
    while True:
        yield one


def timed_steps(trainer: Trainer, batches, steps: int, warmup: int = 2):
    """(pairs/s, data-wait fraction) of ``Trainer.step`` over ``steps`` steps after ``warmup`` untimed ones.
    The step itself synchronises (it reads the loss), so each step's time is complete."""
    wait = total = 0.0
    pairs = 0
    for i in range(warmup + steps):
        start = time.perf_counter()
        batch = next(batches)
        loaded = time.perf_counter()
        trainer.step(batch, i)
        if i >= warmup:
            wait += loaded - start
            total += time.perf_counter() - start
            pairs += batch["view1"].shape[0]
    return pairs / total, wait / total


def forever(loader):
    while True:  # iterating a view-pair loader again starts its next epoch
        yield from loader


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (workers start, JIT, autotune)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--data", default="synthetic", help=DATA_HELP)
    p.add_argument("--copies", type=int, default=1, help="synthetic only: link each file N times (bigger epochs)")
    p.add_argument("--backends", default="torch", help="comma-separated: torch, dali, ffcv")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = TrainConfig(arch=args.arch, view_size=args.size, batch_size=args.batch, queue_size=args.batch * 32 * 16,
                      run_dir=tempfile.mkdtemp(prefix="train_step-"), progress=False)
    trainer = Trainer(cfg, build_model(cfg, device, world=1), 0, 1, device, total=args.warmup + args.steps)
    trainer.wrap()

    rows = [("model only (synthetic tensors)",
             *timed_steps(trainer, synthetic_batches(args.batch, args.size), args.steps, args.warmup))]
    root = resolve_data(args.data, args.copies)
    for backend in args.backends.split(","):
        loader = build_loader(backend, backend_data(backend, root, args.workers), PairSpec(size=(args.size, args.size)),
                              batch_size=args.batch, workers=args.workers, device=device)
        rows.append((f"{backend} loader, {args.workers} workers",
                     *timed_steps(trainer, forever(loader), args.steps, args.warmup)))
    print(f"train step (Trainer.step): VADeR {args.arch}+FPN, {args.size}px views, batch {args.batch}, "
          f"{args.steps} timed steps; {machine()}")
    for name, rate, wait in rows:
        print(f"{name:44s} {rate:10.2f} pairs/s   data wait {100 * wait:5.1f}% of step time")


if __name__ == "__main__":
    main()
