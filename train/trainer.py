"""The training loop: loader -> device augmentation -> MoCo objective -> SGD, with exact resume.

Launch with ``python -m train key=value ...`` on one process, or under torchrun / Slurm (``WORLD_SIZE`` set)
for DDP over env:// (NCCL on GPU, gloo on CPU).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import signal
import threading
import time
import warnings
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model.builder import MoCo, MoCoConfig
from model.network import load_encoder_weights
from pipeline import PhotometricAugment, ViewSpec, make_loader
from pipeline.synthetic import generate

from . import checkpoint
from .config import TrainConfig, to_yaml


def setup_distributed(timeout_s: float = 600) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", init_method="env://", timeout=timedelta(seconds=timeout_s))
    return (dist.get_rank() if world > 1 else 0), world, device


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


_STOP = threading.Event()


def request_stop(*_) -> None:
    """Ask ``run`` to finish its current step, checkpoint and return (a signal handler: preemption, time-out)."""
    _STOP.set()


def stop_requested() -> bool:
    return _STOP.is_set()


def _agree(flags: list[bool], world: int, device: torch.device) -> list[bool]:
    """Any rank's flag, on every rank (one small all-reduce): ranks see a signal, a bad loss or the bad-image
    cap at different moments, and must act on the same step or the next collective would hang."""
    if world == 1:
        return flags
    t = torch.tensor([int(f) for f in flags], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


class Heartbeat:
    """Each rank's background thread writes its current step and the time every second
    (``run_dir/heartbeat/rank<r>``), so a collective that fails or times out can name the rank at fault: a
    frozen, crashed or killed process stops beating; a rank stuck in its own work (data, a hung kernel) beats
    but falls behind the step the others wait in."""

    INTERVAL_S = 1.0

    def __init__(self, run_dir: Path, rank: int, world: int):
        self.folder, self.rank, self.world, self.step = run_dir / "heartbeat", rank, world, 0
        if world > 1:
            self.folder.mkdir(parents=True, exist_ok=True)
            threading.Thread(target=self._run, daemon=True, name="heartbeat").start()

    def _run(self) -> None:
        path = self.folder / f"rank{self.rank}"
        while True:
            path.with_suffix(".tmp").write_text(f"{self.step} {time.time():.3f}")
            os.replace(path.with_suffix(".tmp"), path)  # readers never see a half-written beat
            time.sleep(self.INTERVAL_S)

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
        try:
            yield
        except (RuntimeError, dist.DistError) as err:  # gloo and NCCL time-outs and peer failures
            if self.world == 1 or not any(w in str(err).lower() for w in ("timeout", "timed out", "connection",
                                                                            "closed", "reset", "peer")):
                raise
            raise RuntimeError(f"a collective operation failed on rank {self.rank} ({str(err).splitlines()[0]}): "
                               f"{self.diagnosis()}; heartbeats in {self.folder}") from err


def _forward_mutated_state(model: MoCo) -> dict[str, torch.Tensor]:
    """Copies of what a forward pass changes without gradients (momentum encoder, queues, BatchNorm statistics),
    so a step with a non-finite loss can be undone: everything but the query encoder's parameters."""
    trained = {f"encoder_q.{name}" for name, _ in model.encoder_q.named_parameters()}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in trained}


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


def data_root(cfg: TrainConfig, rank: int, world: int) -> Path:
    """The ImageFolder (or .beton) to train on; the embedded set is generated, and with backend=ffcv an
    ImageFolder is written once to ``run_dir/train.beton`` (for ImageNet, write it ahead: python -m pipeline.ffcv)."""
    root = Path(cfg.data)
    if cfg.data == "synthetic":
        if rank == 0:
            generate(cfg.synthetic_dir, progress=cfg.progress)
        root = Path(cfg.synthetic_dir) / "train"
    if cfg.backend == "ffcv" and root.suffix != ".beton":
        beton = Path(cfg.run_dir) / "train.beton"
        if rank == 0 and not beton.is_file():
            from pipeline.ffcv import write_beton
            print(f"writing {beton} from {root} (once; pass data=<file>.beton to reuse one)", flush=True)
            partial = beton.with_suffix(".partial")
            write_beton(root, partial, workers=cfg.workers, max_bad_images=cfg.max_bad_images).rename(beton)
            bad = partial.with_name(partial.name + ".skipped.txt")
            if bad.exists():  # the writer's list joins the run's
                with open(Path(cfg.run_dir) / "skipped.txt", "a") as f:
                    f.write(bad.read_text())
        root = beton
    _barrier(world)
    return root


def learning_rate(base: float, step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero (MoCo v2's schedule, per step)."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


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


def _rng_state(augment_gen: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "augment": augment_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict, augment_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    augment_gen.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _gather_objects(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def build_loader(cfg: TrainConfig, root: Path, per_rank: int, rank: int, world: int, device: torch.device,
                 state: dict | None = None):
    """The configured backend's loader; ``state``: this rank's ``loader_states`` entry from a checkpoint."""
    spec = ViewSpec(size=(cfg.view_size, cfg.view_size))
    if cfg.backend == "dali":
        from pipeline.dali import DaliViewPairLoader
        return DaliViewPairLoader(root, per_rank, cfg.workers, device.index if device.type == "cuda" else None,
                                  cfg.seed, spec, cfg.num_matches, cfg.min_matches, 4, rank, world,
                                  skip_log=str(Path(cfg.run_dir) / "skipped.txt"), state=state)
    if cfg.backend == "ffcv":
        from pipeline.ffcv import FfcvViewPairLoader
        return FfcvViewPairLoader(root, per_rank, cfg.workers, cfg.seed, spec, cfg.num_matches, cfg.min_matches, 4,
                                  order=cfg.ffcv_order, distributed=world > 1)
    return make_loader(root, per_rank, cfg.workers, cfg.seed, spec, cfg.num_matches, cfg.min_matches, 4, rank,
                       world, pin_memory=device.type == "cuda", skip_log=str(Path(cfg.run_dir) / "skipped.txt"))


def saved_loader_state(state: dict | None, rank: int, world: int) -> dict | None:
    """This rank's loader state in a checkpoint. Only DALI keeps one (its reader and RNG have their own state;
    the other backends derive every batch from the seed, epoch and position)."""
    states = (state or {}).get("loader_states") or [None]
    if len(states) != world:
        if any(states) and rank == 0:
            warnings.warn(f"the checkpoint holds DALI states of {len(states)} ranks, this run has {world}: DALI "
                          "restarts its reader, so the rest of the epoch sees other batches than the first run")
        return None
    return states[rank]


def set_epoch(loader, epoch: int, batches_done: int) -> None:
    """Position any backend at ``batches_done`` batches into ``epoch``."""
    if hasattr(loader, "sampler"):  # torch DataLoader over SeededSampler: skips samples, no decoding
        loader.sampler.set_epoch(epoch, start=batches_done * loader.batch_size)
    else:
        loader.set_epoch(epoch, batches_done)


def build_model(cfg: TrainConfig, device: torch.device, world: int) -> MoCo:
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = MoCo(MoCoConfig(objective=cfg.objective, arch=cfg.arch, queue_size=cfg.queue_size,
                            momentum=cfg.moco_momentum, temperature=cfg.temperature, loss_scale=cfg.loss_scale,
                            symmetric=cfg.symmetric, densecl_lambda=cfg.densecl_lambda,
                            shuffle_bn=not cfg.sync_bn))
    if cfg.init_encoder:
        load_encoder_weights(model.encoder_q.encoder, cfg.init_encoder)
        model.encoder_k.load_state_dict(model.encoder_q.state_dict())
    if cfg.sync_bn:
        if device.type != "cuda" or world == 1:
            raise ValueError("sync_bn=true needs DDP on GPUs; on one process or CPU use shuffle-BN (the default)")
        model.encoder_q = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.encoder_q)
        model.encoder_k = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.encoder_k)
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


class Trainer:
    """One rank's optimisation state and its step: device augmentation -> forward -> agreement -> backward.

    ``step`` is the body of the training loop; ``run`` wraps it with loading, logging and checkpoints.
    """

    def __init__(self, cfg: TrainConfig, model: MoCo, rank: int, world: int, device: torch.device, total: int):
        self.cfg, self.model, self.rank, self.world, self.device, self.total = cfg, model, rank, world, device, total
        encoder_params = list(model.encoder_q.encoder.parameters())
        ids = {id(p) for p in encoder_params}
        head_params = [p for p in model.encoder_q.parameters() if id(p) not in ids]
        scale = cfg.batch_size / 256
        self.base_lrs = [cfg.lr * scale, cfg.decoder_lr * scale]
        self.optimizer = torch.optim.SGD([{"params": encoder_params}, {"params": head_params}], lr=self.base_lrs[0],
                                         momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay)
        self.augment = PhotometricAugment().to(device)
        self.augment_gen = torch.Generator(device).manual_seed(cfg.seed * 1000 + rank)
        torch.manual_seed(cfg.seed * 1000 + rank)  # shuffle-BN permutations
        self.run_dir = Path(cfg.run_dir)
        self.skipped = SkippedImages(self.run_dir / "skipped.txt", cfg.max_bad_images)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.use_amp = cfg.amp and device.type == "cuda"
        self.nonfinite_skips = 0
        self.forward = None  # set by wrap(), after a resume has loaded the weights

    def wrap(self) -> None:
        net = DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda" else None,
                                      broadcast_buffers=False) if self.world > 1 else self.model
        self.forward = torch.compile(net) if self.cfg.compile else net

    def set_learning_rates(self, step: int) -> list[float]:
        lrs = [learning_rate(b, step, self.total, self.cfg.warmup_steps) for b in self.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        return lrs

    def step(self, batch: dict, step: int) -> tuple[float, dict, bool]:
        """Train on one batch as step ``step + 1``: returns the loss, its parts and whether every rank agreed
        to stop after it (a signal on any rank)."""
        cfg = self.cfg
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        v1 = self.augment(batch["view1"], self.augment_gen).contiguous(memory_format=self.memory_format)
        v2 = self.augment(batch["view2"], self.augment_gen).contiguous(memory_format=self.memory_format)
        lam = 0.0 if step < cfg.densecl_warmup_steps else cfg.densecl_lambda
        undo = _forward_mutated_state(self.model) if cfg.on_nonfinite == "skip" else None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            loss, stats = self.forward(v1, v2, batch["matches"], batch["match_xy2"], lam)
        value = loss.item()
        nonfinite, stopping, too_many_bad = _agree(
            [not math.isfinite(value), _STOP.is_set(), self.rank == 0 and self.skipped.over_limit()],
            self.world, self.device)
        if stopping:
            _STOP.set()  # every rank, so whoever launched run() sees it
        if nonfinite:
            self._skip_or_raise(value, step, batch["index"], undo)
        if too_many_bad:
            raise RuntimeError(f"more than max_bad_images={cfg.max_bad_images} unreadable images were "
                               f"skipped (listed in {self.skipped.path}); fix the data or raise the limit")
        self.optimizer.zero_grad(set_to_none=True)
        if not nonfinite:
            loss.backward()
            self.optimizer.step()
        return value, stats, stopping

    def _skip_or_raise(self, value: float, step: int, indices: torch.Tensor, undo: dict | None) -> None:
        """A non-finite loss: save the batch's indices, then undo the forward's side effects (on_nonfinite=skip,
        up to max_nonfinite_skips) or stop the run."""
        report = self.run_dir / f"nonfinite_step{step + 1}_rank{self.rank}.json"
        report.write_text(json.dumps({"step": step + 1, "loss": str(value), "rank": self.rank,
                                      "indices": indices.tolist()}))
        if undo is None or self.nonfinite_skips >= self.cfg.max_nonfinite_skips:
            raise FloatingPointError(
                f"loss is not finite at step {step + 1} (this rank's loss {value}; {self.nonfinite_skips} earlier "
                f"step(s) skipped); batch indices saved to {report}; resume=auto restarts from the last checkpoint")
        self.model.load_state_dict(undo, strict=False)  # un-enqueue keys, undo the momentum update
        self.nonfinite_skips += 1
        if self.rank == 0:
            print(f"skipped step {step + 1}: loss not finite (batch indices in {report})", flush=True)

    def resume(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"][self.rank], self.augment_gen)

    def save(self, ckpt_dir: Path, loader, epoch: int, step_in_epoch: int, global_step: int) -> None:
        """Every rank's RNG and loader state goes into rank 0's checkpoint, so a resumed run draws the same
        batches and augmentations."""
        rngs = _gather_objects(_rng_state(self.augment_gen), self.world)
        loader_states = _gather_objects(loader.state_dict() if hasattr(loader, "state_dict") else None, self.world)
        if self.rank == 0:
            checkpoint.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                             "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
                             "rng": rngs, "loader_states": loader_states, "config": asdict(self.cfg)},
                            ckpt_dir, global_step, self.cfg.keep_checkpoints)
        _barrier(self.world)


def run(cfg: TrainConfig) -> MoCo:
    """Train per ``cfg``; returns the (unwrapped) model. Safe to call again after a crash with resume='auto'."""
    rank, world, device = setup_distributed(cfg.collective_timeout_s)
    cfg.validate(world)
    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    resumed = None
    if cfg.resume == "auto":
        resumed = checkpoint.load_latest(ckpt_dir)
    elif cfg.resume:
        resumed = torch.load(cfg.resume, map_location="cpu", weights_only=False), Path(cfg.resume)
    root = data_root(cfg, rank, world)
    loader = build_loader(cfg, root, cfg.batch_size // world, rank, world, device,
                          saved_loader_state(resumed and resumed[0], rank, world))
    steps_per_epoch = len(loader)
    total = cfg.steps or cfg.epochs * steps_per_epoch
    trainer = Trainer(cfg, build_model(cfg, device, world), rank, world, device, total)

    epoch = step_in_epoch = global_step = 0
    if resumed is not None:
        state, path = resumed
        trainer.resume(state)
        epoch, step_in_epoch, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        if rank == 0:
            print(f"resumed from {path} at step {global_step} (epoch {epoch}, batch {step_in_epoch})")
    trainer.wrap()

    log = MetricsLog(run_dir / "metrics.csv", global_step) if rank == 0 else None
    bar = tqdm(total=total, initial=global_step, disable=rank != 0 or not cfg.progress, unit="step",
               dynamic_ncols=True)
    heartbeat = Heartbeat(run_dir, rank, world)
    stopping = False
    with heartbeat.names_stuck_ranks():
        while global_step < total and not stopping:
            set_epoch(loader, epoch, step_in_epoch)
            batches = iter(loader)
            while global_step < total and not stopping:
                start = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    break
                loaded = time.perf_counter()
                lrs = trainer.set_learning_rates(global_step)
                value, stats, stopping = trainer.step(batch, global_step)
                global_step += 1
                step_in_epoch += 1
                if step_in_epoch == steps_per_epoch:
                    epoch, step_in_epoch = epoch + 1, 0
                now = time.perf_counter()
                wait = (loaded - start) / (now - start)
                if log is not None:
                    log.write({"step": global_step, "epoch": epoch, "loss": f"{value:.6f}", "lr": f"{lrs[0]:.6g}",
                               "images_per_s": f"{cfg.batch_size / (now - start):.1f}", "data_wait": f"{wait:.4f}",
                               **{k: f"{v.item():.6f}" for k, v in stats.items()}})
                bar.set_postfix(loss=f"{value:.4f}", wait=f"{wait:.0%}")
                bar.update()
                heartbeat.beat(global_step)
                if global_step % cfg.checkpoint_every == 0 or global_step == total or stopping:
                    trainer.save(ckpt_dir, loader, epoch, step_in_epoch, global_step)
                if stopping and rank == 0:
                    print(f"stop requested: checkpointed step {global_step} of {total}", flush=True)
                if step_in_epoch == 0:
                    break  # epoch finished: the next one reshuffles
    bar.close()
    if log is not None:
        log.close()
    return trainer.model


def main(argv=None) -> None:
    from .config import parse

    cfg = parse(argv)
    signal.signal(signal.SIGUSR2, request_stop)  # e.g. sbatch --signal=USR2@120: checkpoint before the limit
    try:
        run(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
