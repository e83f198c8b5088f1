"""What a run shows while it trains, on rank 0: ``metrics.csv``, TensorBoard scalars and pictures of the dense
features, and a console that reads well in a terminal (a tqdm bar) and in a log file such as Slurm's (one plain
line every ``log_every`` steps or ``log_every_s`` seconds, no carriage returns), ending with a one-line summary.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm import tqdm

from densessl.model.builder import MoCo
from densessl.model.pictures import pca_rgb
from densessl.pipeline.augment import normalize

from .config import TrainConfig
from .run_folder import MetricsLog


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@torch.no_grad()
def feature_picture(model: MoCo, images: torch.Tensor) -> torch.Tensor:
    """``[3, 2H, N*W]`` uint8: the images on top and, below, the first three principal components (over all N
    images together) of the query network's dense output (C5 for a method without one) as colours."""
    net = model.encoder_q
    device = next(net.parameters()).device
    x = normalize(images.to(device).float() / 255)
    was_training = net.training
    net.eval()
    try:
        out = net(x)
    finally:
        net.train(was_training)
    feats = out[model.method.dense_output or "c5"].float().cpu()
    pca = torch.from_numpy(pca_rgb(feats)).permute(0, 3, 1, 2)  # [N, 3, h, w]
    pca = F.interpolate(pca.float(), size=images.shape[-2:], mode="nearest").to(torch.uint8)
    return torch.cat([torch.cat(list(images.cpu()), 2), torch.cat(list(pca), 2)], 1)


class Monitor:
    """Rank 0's view of the run. ``step`` takes each finished step's numbers; ``close`` prints the summary."""

    def __init__(self, cfg: TrainConfig, keys_per_step: int, total: int, start_step: int,
                 images: torch.Tensor | None):
        run_dir = Path(cfg.run.dir)
        self.cfg, self.run_dir, self.total, self.start_step = cfg.run, run_dir, total, start_step
        self.batch_size, self.queue_size = cfg.optim.batch_size, cfg.method.queue_size
        self.metrics = MetricsLog(run_dir / "metrics.csv", start_step)
        self.tensorboard_dir = run_dir / "tensorboard"
        self.writer = None
        if self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.tensorboard_dir), purge_step=start_step + 1 if start_step else None)
        terminal = sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not (self.cfg.progress and terminal))
        self.lines = self.cfg.progress and not terminal
        self.images = images
        self.keys_per_step = keys_per_step
        self.started = self.last_line = time.perf_counter()
        self.pairs = 0
        self.image_seconds = 0.0
        self.pending: list[tuple] = []

    def step(self, step: int, epoch: int, loss: float | torch.Tensor, lrs: list[float], pairs_per_s: float,
             data_wait: float, stats: dict, tries: torch.Tensor, model: MoCo) -> None:
        """Take step ``step``'s (1-based) numbers; the loss and its parts may still be device tensors, which
        are read only at ``flush`` (the trainer's synchronised steps), so logging never stalls the device."""
        self.pending.append((step, epoch, loss, lrs, pairs_per_s, data_wait, stats, tries, model))

    def flush(self) -> None:
        """Write the steps taken since the last flush, reading their device numbers in one transfer."""
        if not self.pending:
            return
        values = [torch.as_tensor(x).detach().float().reshape(()) for row in self.pending
                  for x in (row[2], *row[6].values())]
        read = iter(torch.stack([v.to(values[0].device) for v in values]).tolist())
        for step, epoch, _, lrs, pairs_per_s, data_wait, stats, tries, model in self.pending:
            loss = next(read)
            self._write(step, epoch, loss, lrs, pairs_per_s, data_wait, {k: next(read) for k in stats}, tries,
                        model)
        self.pending = []

    def _write(self, step: int, epoch: int, loss: float, lrs: list[float], pairs_per_s: float, data_wait: float,
               stats: dict, tries: torch.Tensor, model: MoCo) -> None:
        """Record one step: CSV row, TensorBoard scalars (and, every ``log_images_every`` steps and at the
        last, a feature picture of the model as it is at the flush), the bar or a plain line."""
        cfg = self.cfg
        self.pairs += self.batch_size
        parts = {k: float(v) for k, v in stats.items()}
        self.metrics.write({"step": step, "epoch": epoch, "loss": f"{loss:.6f}", "lr": f"{lrs[0]:.6g}",
                            "images_per_s": f"{pairs_per_s:.1f}", "data_wait": f"{data_wait:.4f}",
                            **{k: f"{v:.6f}" for k, v in parts.items()}})
        if self.writer is not None:
            tries = tries.cpu()
            scalars = {"loss/total": loss, **{f"loss/{k.removeprefix('loss_')}": v for k, v in parts.items()},
                       "lr/encoder": lrs[0], "lr/heads": lrs[1], "speed/pairs_per_s": pairs_per_s,
                       "speed/data_wait": data_wait, "epoch": epoch,
                       "queue/fill": min(1.0, step * self.keys_per_step / self.queue_size),
                       "pairs/redrawn": float((tries != 1).double().mean()),
                       "pairs/fell_back": float((tries == 0).double().mean())}
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
            if self.images is not None and (step % cfg.log_images_every == 0 or step == self.total):
                start = time.perf_counter()
                self.writer.add_image("features/pca", feature_picture(model, self.images), step)
                self.image_seconds += time.perf_counter() - start
        self.bar.set_postfix(loss=f"{loss:.4f}", wait=f"{data_wait:.0%}")
        self.bar.update()
        now = time.perf_counter()
        due = step % cfg.log_every == 0 or now - self.last_line >= cfg.log_every_s or step == self.total
        if self.lines and due:
            done = step - self.start_step
            eta = (now - self.started) / done * (self.total - step)
            print(f"step {step}/{self.total}  loss {loss:.4f}  lr {lrs[0]:.4g}  pairs/s {pairs_per_s:.1f}  "
                  f"data wait {data_wait:.0%}  eta {_duration(eta)}", file=sys.stderr, flush=True)
            self.last_line = now

    def close(self, step: int, stopped: bool) -> None:
        """Flush everything and print where the run's outputs are."""
        self.flush()
        self.bar.close()
        self.metrics.close()
        if self.writer is not None:
            self.writer.close()
        seconds = time.perf_counter() - self.started
        how = f"stopped on request at step {step} of {self.total}" if stopped else f"finished step {step} of {self.total}"
        board = f"; TensorBoard: tensorboard --logdir {self.tensorboard_dir}" if self.writer is not None else ""
        pictures = f" ({self.image_seconds:.1f} s of it on feature pictures)" if self.image_seconds else ""
        print(f"{how}: {step - self.start_step} steps in {_duration(seconds)}{pictures}, "
              f"{self.pairs / max(seconds, 1e-9):.1f} pairs/s on average; checkpoints in "
              f"{self.run_dir / 'checkpoints'}{board}", file=sys.stderr, flush=True)
