"""The training loop: loader -> device augmentation -> MoCo objective -> SGD, with exact resume.

Launch with ``python -m densessl.train key=value ...`` on one process, or under torchrun / Slurm (``WORLD_SIZE`` set)
for DDP over env:// (NCCL on GPU, gloo on CPU). ``Trainer`` holds one rank's optimisation state and its step;
``run`` is the loop around it; distributed plumbing is in ``distributed.py``, run-folder bookkeeping in
``run_folder.py``.
"""

from __future__ import annotations

import json
import math
import signal
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from densessl.model import checkpoint
from densessl.model.builder import MoCo
from densessl.pipeline import PhotometricAugment, ViewPairLoader, build_loader

from . import distributed
from .config import TrainConfig, to_yaml
from .monitor import Monitor
from .run_folder import SkippedImages, data_root, fixed_images, rng_state, set_rng_state


def learning_rate(base: float, step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero (MoCo v2's schedule, per step)."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def build_model(cfg: TrainConfig, device: torch.device, world: int) -> MoCo:
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = MoCo(cfg.model_config())
    if cfg.init_encoder:
        checkpoint.load_encoder_weights(model.encoder_q.encoder, cfg.init_encoder)
        model.encoder_k.load_state_dict(model.encoder_q.state_dict())
    if cfg.sync_bn:
        if device.type != "cuda" or world == 1:
            raise ValueError("sync_bn=true needs DDP on GPUs; on one process or CPU use shuffle-BN (the default)")
        model.encoder_q = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.encoder_q)
        model.encoder_k = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.encoder_k)
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def _forward_mutated_state(model: MoCo) -> dict[str, torch.Tensor]:
    """Copies of what a forward pass changes without gradients (momentum encoder, queues, BatchNorm statistics),
    so a step with a non-finite loss can be undone: everything but the query encoder's parameters."""
    trained = {f"encoder_q.{name}" for name, _ in model.encoder_q.named_parameters()}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in trained}


class Trainer:
    """One rank's optimisation state and its step: device augmentation -> forward -> agreement -> backward."""

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
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
        self.nonfinite_skips = 0
        self.first_nonfinite = torch.tensor(-1, device=device)  # first unsynchronised step with a non-finite loss
        self.forward = None  # set by wrap(), after a resume has loaded the weights

    def wrap(self) -> None:
        net = DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda" else None,
                                      broadcast_buffers=False) if self.world > 1 else self.model
        # fallback_random: random draws inside the compiled graph (shuffle-BN's permutation) come from torch's
        # generator as in eager mode, not from inductor's own, so a compiled run follows the eager run
        self.forward = torch.compile(net, options={"fallback_random": True}) if self.cfg.compile else net

    def set_learning_rates(self, step: int) -> list[float]:
        lrs = [learning_rate(b, step, self.total, self.cfg.warmup_steps) for b in self.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        return lrs

    def step(self, batch: dict, step: int, sync: bool = True) -> tuple[float | torch.Tensor, dict, bool]:
        """Train on one batch as step ``step + 1``: returns the loss, its parts and whether every rank agreed
        to stop after it (a stop requested on any rank).

        ``sync=False`` leaves the host free to queue the next step's kernels: the loss comes back as a device
        tensor, a non-finite loss is only recorded on the device (the first such step), and ranks do not agree
        on anything. The next synchronised step raises for a recorded non-finite loss, naming its step, before
        anything is checkpointed; the run then resumes from the last checkpoint, as with ``on_nonfinite=stop``
        at every step. ``on_nonfinite=skip`` must undo a step before the next, so it synchronises every step."""
        cfg = self.cfg
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        v1 = self.augment(batch["view1"], self.augment_gen).contiguous(memory_format=self.memory_format)
        v2 = self.augment(batch["view2"], self.augment_gen).contiguous(memory_format=self.memory_format)
        skip = cfg.on_nonfinite == "skip"
        undo = _forward_mutated_state(self.model) if skip else None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            loss, stats = self.forward(v1, v2, batch["matches"], batch["match_xy2"], step)
        if not (sync or skip):
            bad = ~torch.isfinite(loss.detach()) & (self.first_nonfinite < 0)
            self.first_nonfinite = torch.where(bad, torch.full_like(self.first_nonfinite, step),
                                               self.first_nonfinite)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            return loss.detach(), stats, False
        # one transfer: this loss, and the first non-finite loss of an unsynchronised step since the last sync
        value, earlier = torch.stack([loss.detach().double(), self.first_nonfinite.double()]).tolist()
        earlier = int(earlier)
        nonfinite, stopping, too_many_bad = distributed.agree(
            [not math.isfinite(value) or earlier >= 0, distributed.stop_requested(),
             self.rank == 0 and self.skipped.over_limit()], self.world, self.device)
        if earlier >= 0:
            raise FloatingPointError(
                f"loss is not finite at step {earlier + 1} (found at step {step + 1}, the next synchronised step; "
                f"sync_every={cfg.sync_every}); resume=auto restarts from the last checkpoint")
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
        set_rng_state(state["rng"][self.rank], self.augment_gen)

    def save(self, ckpt_dir: Path, loader: ViewPairLoader, epoch: int, step_in_epoch: int, global_step: int) -> None:
        """Every rank's RNG and loader state goes into rank 0's checkpoint, so a resumed run draws the same
        batches and augmentations; ``model_config`` lets evaluation rebuild the model from the file alone."""
        rngs = distributed.gather_objects(rng_state(self.augment_gen), self.world)
        loader_states = distributed.gather_objects(loader.state_dict(), self.world)
        if self.rank == 0:
            checkpoint.save({"model": self.model.state_dict(), "model_config": asdict(self.model.cfg),
                             "optimizer": self.optimizer.state_dict(), "epoch": epoch, "step_in_epoch": step_in_epoch,
                             "global_step": global_step, "rng": rngs, "loader_states": loader_states,
                             "config": asdict(self.cfg)}, ckpt_dir, global_step, self.cfg.keep_checkpoints)
        distributed.barrier(self.world)


def saved_loader_state(state: dict | None, rank: int, world: int) -> dict | None:
    """This rank's loader state in a checkpoint, when the world size is unchanged."""
    states = (state or {}).get("loader_states") or []
    if states and len(states) != world:
        if rank == 0:
            warnings.warn(f"the checkpoint holds loader states of {len(states)} ranks, this run has {world}: the "
                          "loader continues from the checkpoint's epoch and batch, and DALI, whose reader keeps its "
                          "own state, sees other batches there than the first run")
        return None
    return states[rank] if states else None


@dataclass
class TrainResult:
    model: MoCo  # unwrapped, on the training device
    step: int  # steps done when run returned
    total: int
    stopped: bool  # a stop was requested (preemption, time limit) and honoured: checkpointed before the end


def run(cfg: TrainConfig) -> TrainResult:
    """Train per ``cfg``. Safe to call again after a crash with resume='auto'."""
    # --- set-up: processes, run folder, the checkpoint to resume from
    rank, world, device = distributed.setup(cfg.device, cfg.collective_timeout_s)
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
        resumed = checkpoint.read(cfg.resume), Path(cfg.resume)

    # --- data, model, optimiser
    root = data_root(cfg, rank, world)
    loader = build_loader(cfg.backend, root, cfg.pair_spec(), batch_size=cfg.batch_size // world,
                          workers=cfg.workers, seed=cfg.seed, rank=rank, world_size=world, device=device,
                          state=saved_loader_state(resumed and resumed[0], rank, world),
                          skip_log=str(run_dir / "skipped.txt"),
                          order=cfg.ffcv_order if cfg.backend == "ffcv" else "random")
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

    # --- monitoring (rank 0): metrics.csv, TensorBoard, console
    monitor = None
    if rank == 0:
        images = fixed_images(root, cfg.log_images, cfg.view_size) if cfg.tensorboard and cfg.log_images else None
        monitor = Monitor(cfg, run_dir, total, global_step, images)
    heartbeat = distributed.Heartbeat(run_dir, rank, world)

    # --- the loop: an epoch at a time, from the resumed position
    stopping = False
    with heartbeat.names_stuck_ranks():
        while global_step < total and not stopping:
            loader.set_epoch(epoch, step_in_epoch)
            batches = iter(loader)
            while global_step < total and not stopping:
                # step
                start = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    break
                loaded = time.perf_counter()
                lrs = trainer.set_learning_rates(global_step)
                due = global_step + 1  # the step about to be done (1-based)
                sync = due % cfg.sync_every == 0 or due % cfg.checkpoint_every == 0 or due == total
                value, stats, stopping = trainer.step(batch, global_step, sync)
                global_step += 1
                step_in_epoch += 1
                if step_in_epoch == steps_per_epoch:
                    epoch, step_in_epoch = epoch + 1, 0
                # monitoring
                now = time.perf_counter()
                if monitor is not None:
                    monitor.step(global_step, epoch, value, lrs, cfg.batch_size / (now - start),
                                 (loaded - start) / (now - start), stats, batch["tries"], trainer.model)
                    if sync:
                        monitor.flush()
                heartbeat.beat(global_step)
                # checkpoint
                if global_step % cfg.checkpoint_every == 0 or global_step == total or stopping:
                    trainer.save(ckpt_dir, loader, epoch, step_in_epoch, global_step)
                if stopping and rank == 0:
                    print(f"stop requested: checkpointed step {global_step} of {total}", flush=True)
                if step_in_epoch == 0:
                    break  # epoch finished: the next one reshuffles

    # --- wrap-up
    if monitor is not None:
        monitor.close(global_step, stopping)
    if stopping:
        distributed.clear_stop()  # honoured: a later run in this process starts without it
    return TrainResult(trainer.model, global_step, total, stopping)


def main(argv=None) -> None:
    from .config import parse

    cfg = parse(argv)
    signal.signal(signal.SIGUSR2, distributed.request_stop)  # e.g. sbatch --signal=USR2@120: checkpoint first
    try:
        run(cfg)
    except checkpoint.CheckpointError as err:  # a file given as resume= or init_encoder=: one line, no traceback
        raise SystemExit(f"error: {err}") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
