"""The depth protocol's upper bound: the same encoder trained for depth, with labels, on the training scenes.

A frozen probe can only read what features hold; this says how much of depth the pixels of a data set show to
an encoder of that architecture at all. The encoder starts from random init and is trained end to end through
the read-out the probes use (the ``hypercolumn``: C2..C5 at stride 4, each L2-normalised), with a per-channel
standardisation (BatchNorm without affine, as the probe standardises) and a 1x1 convolution to metres, on an L1
loss over valid pixels at stride 4, for a fixed budget of steps (Adam with a cosine schedule), on images
augmented as pretraining augments its views (MoCo v2's photometric recipe, and horizontal flips).
Its features then go through the same linear depth probe as every other row (``probe.linear_probe``), so the
bound differs from them in the weights alone. ``make compare`` and ``evaluation all`` report it beside the random
init and depth from position alone, with its cost.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from densessl.model.network import build_encoder
from densessl.pipeline.augment import PhotometricAugment
from densessl.pipeline.progress import progress

from .datasets import DenseSet
from .features import Hypercolumn
from .probe import linear_probe, load_uint8, resize_target

BOUND_STEPS = 300  # the default budget (its cost and scores against fewer steps: benchmarks/RESULTS.md)
BOUND_BATCH = 8
BOUND_LR = 1e-3


def _depth_statistics(train: DenseSet) -> tuple[float, float]:
    """Mean and standard deviation of the valid depths (> 0) of a set, one target at a time."""
    n = total = squares = 0.0
    for j in range(len(train)):
        valid = train.read_target(j)
        valid = valid[valid > 0].astype(np.float64)
        n, total, squares = n + valid.size, total + valid.sum(), squares + np.square(valid).sum()
    if n == 0:
        raise ValueError(f"{train.name}: no valid depth (> 0) to train for depth on")
    mean = total / n
    return mean, max(squares / n - mean * mean, 0.0) ** 0.5 + 1e-6


def train_for_depth(arch: str, train: DenseSet, size: tuple[int, int], steps: int = BOUND_STEPS,
                    batch: int = BOUND_BATCH, seed: int = 0, device="cpu") -> tuple[Hypercolumn, dict]:
    """``arch`` from random init (``seed``) trained to predict ``train``'s depth at ``size`` for ``steps`` steps
    of ``batch`` images; returns its hypercolumn extractor (eval mode, on ``device``) and the cost: steps, batch,
    seconds, and the training loss (mean L1 in metres) over the first and the last tenth of the steps."""
    if train.task != "depth":
        raise ValueError(f"{train.name}: a depth set is needed to train for depth, not a {train.task} set")
    if steps < 1:
        raise ValueError(f"steps={steps}: train for depth at least one step")
    torch.manual_seed(seed)
    extractor = Hypercolumn(arch, build_encoder(arch).net.state_dict(), f"random {arch}").to(device).train()
    with torch.no_grad():
        channels = extractor(torch.zeros(1, 3, *size)).shape[1]
    head = nn.Sequential(nn.BatchNorm2d(channels, affine=False), nn.Conv2d(channels, 1, 1)).to(device).train()
    mean, std = _depth_statistics(train)  # the loss is in standardised depth
    params = [*extractor.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=BOUND_LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    order, augment = torch.Generator().manual_seed(seed), PhotometricAugment()
    queue, losses, started = torch.empty(0, dtype=torch.long), [], time.monotonic()
    for _ in progress(range(steps), f"depth upper bound: training {arch}", unit="step"):
        if len(queue) < batch:
            queue = torch.cat([queue, torch.randperm(len(train), generator=order)])
        pick, queue = queue[:batch], queue[batch:]  # images read as drawn: a set of any size fits in memory
        x = augment(torch.stack([load_uint8(train.images[j], size) for j in pick.tolist()]), order)
        y = torch.stack([resize_target(train.read_target(j), size) for j in pick.tolist()])[:, None].float()
        flip = torch.rand(len(pick), generator=order) < 0.5
        x, y = torch.where(flip[:, None, None, None], x.flip(-1), x), torch.where(flip[:, None, None, None], y.flip(-1), y)
        pred = head(extractor(x.to(device)))
        y = F.interpolate(y, size=pred.shape[-2:], mode="nearest").to(device)
        valid = y > 0
        loss = (pred - (y - mean) / std).abs()[valid].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(loss.item() * std)
    if not math.isfinite(losses[-1]):
        raise RuntimeError(f"depth upper bound: training {arch} for depth diverged (loss {losses[-1]})")
    tenth = max(1, steps // 10)
    return extractor.eval(), {"steps": steps, "batch": batch, "seconds": time.monotonic() - started,
                              "first L1": sum(losses[:tenth]) / tenth, "train L1": sum(losses[-tenth:]) / tenth}


def depth_upper_bound(arch: str, depth_sets: tuple[DenseSet, DenseSet], size: tuple[int, int],
                      steps: int = BOUND_STEPS, device="cpu") -> dict:
    """``train_for_depth`` on the first of ``depth_sets`` (train, test), then its hypercolumn through the linear
    depth probe, fitted on train and scored on test: ``linear_probe``'s result with the training's cost
    (``steps``, ``batch``, ``seconds``, ``train L1``) and ``arch``."""
    extractor, cost = train_for_depth(arch, depth_sets[0], size, steps, device=device)
    return {**linear_probe(extractor, *depth_sets, size), **cost, "arch": arch}


def describe(bound: dict) -> str:
    """One line for a report: what the bound is, what it cost and what it scores."""
    return (f"Depth upper bound: {bound['arch']} trained for depth with labels on the training scenes "
            f"({bound['steps']} steps of {bound['batch']} images, {bound['seconds'] / 60:.1f} min), read by the same "
            f"probe: RMSE {bound['RMSE']:.3f}, δ1 {bound['delta1']:.3f}.")
