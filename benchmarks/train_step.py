"""Training-step throughput as a fraction of the hardware: pairs/s, achieved TFLOP/s and share of the device's
peak for each objective, next to a plain torchvision ResNet-50 supervised step timed in the same run (the
anchor: "x of a tuned RN50 step on this GPU"), and the same step fed by each loader backend.

    python -m densessl.benchmarks.train_step [--objectives vader,densecl,mocov2] [--arch resnet50,vit_small_patch16_224]
                                    [--size 224]
                                    [--batch 8] [--steps 5] [--compile] [--sync-every 1]
                                    [--data synthetic] [--backends torch,dali,ffcv] [--workers 2]
                                    [--profile DIR]

FLOPs are counted on the real step (``torch.utils.flop_counter`` around one ``Trainer.step``: forward,
backward, key encoder), not estimated by hand; a ViT's fused attention on the CPU is counted with torch's own
formulas for fused attention on CUDA, which the counter does not apply to the CPU kernel by itself. ``--profile
DIR`` writes a torch profiler trace of a few steps (open it in Perfetto or chrome://tracing) and prints the
kernels that took the most time.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torchvision
from torch.nn import functional as F
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from densessl.model.builder import ModelConfig
from densessl.model.methods import DEFAULT, METHODS, method_class, method_config
from densessl.pipeline import PairSpec, build_loader
from densessl.train.config import OptimConfig, RunConfig, TrainConfig
from densessl.train.trainer import Trainer, build_model

from .common import machine
from .loader import DATA_HELP, backend_data, resolve_data

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets; matched by device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0}


def peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None (CPU, or a GPU not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def synthetic_batches(batch: int, size: int, k: int = 32, pin: bool = False):
    """One random batch of view pairs (``pipeline.contract.BATCH`` of a ``PairSpec``'s views) in host memory, as a
    loader hands it over (pinned for a GPU, as our loaders pin it:
    a copy from pageable memory would wait for the GPU to finish the previous step)."""
    grid = size // 4
    views = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    matches = torch.randint(0, grid * grid, (batch, k, 2))
    xy = torch.rand(batch, k, 2) * grid
    one = {"views/pair": torch.stack([views, views.flip(3)], 1), "matches/pair0-pair1": matches,
           "match_xy/pair0-pair1": xy, "index": torch.arange(batch),
           "tries/pair": torch.ones(batch, 2, dtype=torch.long)}
    if pin:
        one = {key: v.pin_memory() for key, v in one.items()}
    while True:
        yield one


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(trainer: Trainer, batches, steps: int, warmup: int = 2):
    """(pairs/s, data-wait fraction) of ``Trainer.step`` over ``steps`` steps after ``warmup`` untimed ones,
    synchronising as the trainer would (every ``sync_every`` steps) and the device once at the end."""
    sync_every = trainer.cfg.run.sync_every
    for i in range(warmup):
        trainer.step(next(batches), i)
    _synchronize(trainer.device)
    wait = 0.0
    pairs = 0
    begin = time.perf_counter()
    for i in range(steps):
        start = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - start
        trainer.step(batch, warmup + i, sync=(i + 1) % sync_every == 0 or i + 1 == steps)
        pairs += batch["index"].shape[0]
    _synchronize(trainer.device)
    total = time.perf_counter() - begin
    return pairs / total, wait / total


def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# the CPU's fused attention kernels, which torch's counter has no formula for (its CUDA ones have these)
CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward}


def step_flops(trainer: Trainer, batch: dict, step: int = 0) -> int:
    """FLOPs of one real training step, counted by torch's FLOP counter (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        trainer.step(batch, step)
    return counter.get_total_flops()


def make_trainer(objective: str, arch: str, args, device: torch.device, batch: dict,
                 run_dir: Path) -> tuple[Trainer, int]:
    """The trainer (its run folder ``run_dir``, where nothing is written unless a step goes wrong), and the FLOPs
    of one of its steps on ``batch``, counted on the eager step before the model is compiled (under the FLOP
    counter's dispatch mode torch.compile would run the model eagerly)."""
    views = PairSpec(size=args.size)
    keys = method_class(objective)(method_config(objective)).keys_per_sample(views)
    cfg = TrainConfig(views=views, model=ModelConfig(arch=arch),
                      method=method_config(objective, queue_size=args.batch * keys * 16),
                      optim=OptimConfig(batch_size=args.batch),
                      run=RunConfig(dir=str(run_dir), progress=False, compile=False,
                                    sync_every=args.sync_every, tensorboard=False,
                                    channels_last=not args.contiguous))
    cfg.validate()
    trainer = Trainer(cfg, build_model(cfg, device, world=1), 0, 1, device, total=10 ** 6)
    trainer.wrap()
    flops = step_flops(trainer, batch)
    if args.compile:
        trainer.cfg = replace(cfg, run=replace(cfg.run, compile=True))
        trainer.wrap()
    return trainer, flops


class ResNet50Step:
    """The anchor: a supervised torchvision ResNet-50 step (cross-entropy, SGD with momentum), with the same
    precision and memory format as our trainer (bf16 autocast and channels_last on a GPU)."""

    def __init__(self, batch: int, size: int, device: torch.device):
        self.device = device
        torch.backends.cudnn.benchmark = True  # tuned: cuDNN's fastest algorithms for these fixed shapes
        self.net = torchvision.models.resnet50().to(device, memory_format=torch.channels_last)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        self.x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, 1000, (batch,), device=device)

    def step(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss = F.cross_entropy(self.net(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def rate(self, steps: int, warmup: int) -> tuple[float, int]:
        """(images/s, FLOPs per step)."""
        for _ in range(warmup):
            self.step()
        with FlopCounterMode(display=False) as counter:
            self.step()
        _synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        _synchronize(self.device)
        return steps * self.x.shape[0] / (time.perf_counter() - start), counter.get_total_flops()


def profile(trainer: Trainer, batches, out: str, steps: int = 5) -> None:
    """A profiler trace of ``steps`` steps in ``out`` and the top kernels by time on stdout."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for i in range(steps):
            trainer.step(next(batches), i)
        _synchronize(trainer.device)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"trace_{trainer.cfg.method.name}.json")
    prof.export_chrome_trace(path)
    key = "self_cuda_time_total" if trainer.device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile of {steps} {trainer.cfg.method.name} steps ({path}), top kernels by {key}:")
    print(prof.key_averages().table(sort_by=key, row_limit=15))


def forever(loader):
    while True:  # iterating a view-pair loader again starts its next epoch
        yield from loader


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objectives", default=DEFAULT, help=f"comma-separated methods: {', '.join(METHODS)}")
    p.add_argument("--arch", default="resnet50", help="comma-separated encoders: ResNets, timm ViTs (a row each)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (workers start, JIT, autotune)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (TrainConfig.compile)")
    p.add_argument("--sync-every", type=int, default=1, help="steps between host synchronisations")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--data", default="synthetic", help=DATA_HELP)
    p.add_argument("--copies", type=int, default=1, help="synthetic only: link each file N times (bigger epochs)")
    p.add_argument("--backends", default="", help="comma-separated loaders to feed the first objective: torch, "
                                                   "dali, ffcv (default: none, the model alone)")
    p.add_argument("--no-anchor", action="store_true", help="skip the ResNet-50 supervised anchor")
    p.add_argument("--contiguous", action="store_true", help="run.channels_last=false: NCHW activations")
    p.add_argument("--profile", metavar="DIR", help="write a profiler trace per objective to DIR")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="train_step-") as scratch:  # the trainers' run folders, removed after
        run(args, Path(scratch))


def run(args, scratch: Path) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = peak_tflops(device)
    print(f"train step (Trainer.step): {args.arch}, {args.size}px views, batch {args.batch}, {args.steps} timed "
          f"steps after {args.warmup}, compile={args.compile}, sync_every={args.sync_every}, "
          f"channels_last={not args.contiguous}; {machine()}; "
          f"bf16 peak {f'{peak:.0f} TFLOP/s' if peak else 'unknown'}")
    anchor_tflops = None
    if not args.no_anchor:
        rate, flops = ResNet50Step(args.batch, args.size, device).rate(args.steps, args.warmup)
        anchor_tflops = rate / args.batch * flops / 1e12
        share = f"{100 * anchor_tflops / peak:5.1f}% of peak" if peak else ""
        print(f"{'anchor: torchvision resnet50 supervised':44s} {rate:10.1f} img/s   {flops / args.batch / 1e9:6.1f} "
              f"GFLOP/img   {anchor_tflops:7.2f} TFLOP/s {share}")
    first = None
    for arch in args.arch.split(","):
        for objective in args.objectives.split(","):
            batches = synthetic_batches(args.batch, args.size, pin=device.type == "cuda")
            run_dir = scratch / f"{arch}_{objective}"
            run_dir.mkdir()
            trainer, flops = make_trainer(objective, arch, args, device, next(batches), run_dir)
            first = first or trainer
            rate, _ = timed_steps(trainer, batches, args.steps, args.warmup)
            tflops = rate / args.batch * flops / 1e12
            share = f"{100 * tflops / peak:5.1f}% of peak" if peak else ""
            anchor = f"{tflops / anchor_tflops:5.2f}x anchor" if anchor_tflops else ""
            print(f"{objective + ' ' + arch + ' (model only)':44s} {rate:10.1f} pairs/s "
                  f"{flops / args.batch / 1e9:6.1f} GFLOP/pair  {tflops:7.2f} TFLOP/s {share} {anchor}")
            if args.profile:
                profile(trainer, batches, args.profile)
    if args.backends:
        root = resolve_data(args.data, args.copies)
        for backend in args.backends.split(","):
            loader = build_loader(backend, backend_data(backend, root, args.workers),
                                  PairSpec(size=(args.size, args.size)).view_spec, batch_size=args.batch,
                                  workers=args.workers, device=device)
            rate, wait = timed_steps(first, forever(loader), args.steps, args.warmup)
            print(f"{first.cfg.method.name + ' fed by ' + backend + f', {args.workers} workers':44s} {rate:10.1f} "
                  f"pairs/s   data wait {100 * wait:5.1f}% of step time")


if __name__ == "__main__":
    main()
