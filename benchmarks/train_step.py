"""Training-step throughput: forward+backward pairs/s of the model alone (synthetic tensors already on the
device) and fed by each loader backend, with the fraction of step time spent waiting for data.

    python -m benchmarks.train_step [--arch resnet50] [--size 224] [--batch 8] [--steps 5] [--data synthetic]
                                    [--backends torch,dali,ffcv] [--workers 2]

DALI decodes on the GPU (``mixed``) when there is one; FFCV reads a .beton written beside the data.
"""

from __future__ import annotations

import argparse
import time

import torch

from pipeline import PhotometricAugment, ViewSpec
from train.config import TrainConfig
from train.trainer import build_model

from .common import machine
from .loader import DATA_HELP, build_loader, resolve_data


def synthetic_batches(batch: int, size: int, k: int = 32):
    grid = size // 4
    views = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    matches = torch.randint(0, grid * grid, (batch, k, 2))
    xy = torch.rand(batch, k, 2) * grid
    one = {"view1": views, "view2": views.flip(3), "matches": matches, "match_xy2": xy}
    while True:
        yield one


def timed_steps(model, augment, optimizer, batches, steps: int, device, warmup: int = 2):
    """(pairs/s, data-wait fraction) over ``steps`` steps after ``warmup`` untimed ones."""
    wait = total = 0.0
    pairs = 0
    use_amp = device.type == "cuda"
    for i in range(warmup + steps):
        start = time.perf_counter()
        batch = next(batches)
        loaded = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "index"}
        v1 = augment(batch["view1"]).contiguous(memory_format=torch.channels_last)
        v2 = augment(batch["view2"]).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss, _ = model(v1, v2, batch["matches"], batch["match_xy2"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()  # synchronise
        if i >= warmup:
            wait += loaded - start
            total += time.perf_counter() - start
            pairs += v1.shape[0]
    return pairs / total, wait / total


def forever(loader):
    epoch = 0
    while True:
        if hasattr(loader, "sampler"):
            loader.sampler.set_epoch(epoch)
        else:
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


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
    cfg = TrainConfig(arch=args.arch, view_size=args.size, batch_size=args.batch, queue_size=args.batch * 32 * 16)
    model = build_model(cfg, device, world=1)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    augment = PhotometricAugment().to(device)

    rows = [("model only (synthetic tensors)",
             *timed_steps(model, augment, optimizer, synthetic_batches(args.batch, args.size), args.steps, device,
                         args.warmup))]
    root = resolve_data(args.data, args.copies)
    spec = ViewSpec(size=(args.size, args.size))
    for backend in args.backends.split(","):
        loader, _ = build_loader(backend, root, args.workers, args.batch, spec,
                                 (device.index or 0) if device.type == "cuda" else None, device.type == "cuda")
        rows.append((f"{backend} loader, {args.workers} workers",
                     *timed_steps(model, augment, optimizer, forever(loader), args.steps, device, args.warmup)))
    print(f"train step: VADeR {args.arch}+FPN, {args.size}px views, batch {args.batch}, {args.steps} timed steps; "
          f"{machine()}")
    for name, rate, wait in rows:
        print(f"{name:44s} {rate:10.2f} pairs/s   data wait {100 * wait:5.1f}% of step time")


if __name__ == "__main__":
    main()
