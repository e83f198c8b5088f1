"""The training loop: loader -> device augmentation -> the method's loss -> SGD (or AdamW), with exact resume.

Launch with ``python -m densessl.train section.key=value ...`` on one process, or under torchrun / Slurm
(``WORLD_SIZE`` set)
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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from densessl.model import checkpoint
from densessl.model.builder import MoCo, model_config
from densessl.pipeline import PhotometricAugment, ViewLoader, build_loader, owned, preview_images
from densessl.pipeline.contract import matched_views

from . import distributed, healing, run_folder
from .config import ConfigError, TrainConfig, to_dict
from .healing import RestartingLoader
from .monitor import Monitor
from .run_folder import SkippedImages, rng_state, set_rng_state


def learning_rate(base: float, step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero (MoCo v2's schedule, per step)."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def build_model(cfg: TrainConfig, device: torch.device, world: int) -> MoCo:
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = MoCo(cfg.model, cfg.method)
    if cfg.model.init_encoder:
        checkpoint.load_encoder_weights(model.encoder_q.encoder, cfg.model.init_encoder)
        model.encoder_k.load_state_dict(model.encoder_q.state_dict())
    if cfg.model.sync_bn:
        if device.type != "cuda" or world == 1:
            raise ConfigError("model.sync_bn=true needs DDP on GPUs; on one process or CPU use shuffle-BN (the "
                              "default)")
        model.encoder_q = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.encoder_q)
        model.encoder_k = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.encoder_k)
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if cfg.run.channels_last else model


def _forward_mutated_state(model: MoCo) -> dict[str, torch.Tensor]:
    """Copies of what a forward pass changes without gradients (momentum encoder, queues, BatchNorm statistics),
    so a step with a non-finite loss can be undone: everything but the query encoder's parameters."""
    trained = {f"encoder_q.{name}" for name, _ in model.encoder_q.named_parameters()}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in trained}


class Trainer:
    """One rank's optimisation state and its step: device augmentation -> forward -> agreement -> backward."""

    def __init__(self, cfg: TrainConfig, model: MoCo, rank: int, world: int, device: torch.device, total: int):
        self.cfg, self.model, self.rank, self.world, self.device, self.total = cfg, model, rank, world, device, total
        optim, run = cfg.optim, cfg.run
        encoder_params = list(model.encoder_q.encoder.parameters())
        ids = {id(p) for p in encoder_params}
        head_params = [p for p in model.encoder_q.parameters() if id(p) not in ids]
        scale = optim.batch_size / 256
        self.base_lrs = [optim.lr * scale, optim.decoder_lr * scale]
        groups = [{"params": encoder_params}, {"params": head_params}]
        if optim.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(groups, lr=self.base_lrs[0], weight_decay=optim.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=self.base_lrs[0], momentum=optim.sgd_momentum,
                                             weight_decay=optim.weight_decay)
        self.augment = PhotometricAugment().to(device)
        self.augment_gen = torch.Generator(device).manual_seed(run.seed * 1000 + rank)
        torch.manual_seed(run.seed * 1000 + rank)  # shuffle-BN permutations
        self.run_dir, self.spec = Path(run.dir), cfg.view_spec()
        self.skipped = SkippedImages(self.run_dir / "skipped.txt", cfg.data.max_bad_images)
        self.memory_format = torch.channels_last if run.channels_last else torch.contiguous_format
        self.use_amp = run.amp and device.type == "cuda"
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = run.cudnn_benchmark
        self.nonfinite_skips = 0
        self.first_nonfinite = torch.tensor(-1, device=device)  # first unsynchronised step with a non-finite loss
        self.forward = None  # set by wrap(), after a resume has loaded the weights

    def wrap(self) -> None:
        net = DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda" else None,
                                      broadcast_buffers=False) if self.world > 1 else self.model
        # fallback_random: random draws inside the compiled graph (shuffle-BN's permutation) come from torch's
        # generator as in eager mode, not from inductor's own, so a compiled run follows the eager run
        self.forward = torch.compile(net, options={"fallback_random": True}) if self.cfg.run.compile else net

    def set_learning_rates(self, step: int) -> list[float]:
        lrs = [learning_rate(b, step, self.total, self.cfg.optim.warmup_steps) for b in self.base_lrs]
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
        run = self.cfg.run
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        skip = run.on_nonfinite == "skip"
        undo = _forward_mutated_state(self.model) if skip else None
        inputs = self._inputs(batch)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            loss, stats = self.forward(*inputs, step)
        value, nonfinite, stopping = loss.detach(), False, False
        if sync or skip:
            # one transfer: this loss, and the first non-finite loss of an unsynchronised step since the last sync
            value, earlier = torch.stack([value.double(), self.first_nonfinite.double()]).tolist()
            earlier = int(earlier)
            nonfinite, stopping, too_many_bad = distributed.agree(
                [not math.isfinite(value) or earlier >= 0, distributed.stop_requested(),
                 self.rank == 0 and self.skipped.over_limit()], self.world, self.device)
            if earlier >= 0:
                raise FloatingPointError(
                    f"loss is not finite at step {earlier + 1} (found at step {step + 1}, the next synchronised "
                    f"step; run.sync_every={run.sync_every}); run.resume=auto restarts from the last checkpoint")
            if nonfinite:
                self._skip_or_raise(value, step, batch["index"], undo)
            if too_many_bad:
                raise RuntimeError(f"more than data.max_bad_images={self.cfg.data.max_bad_images} unreadable "
                                   f"images were skipped (listed in {self.skipped.path}); fix the data or raise "
                                   "the limit")
        else:  # recorded on the device, raised at the next synchronised step
            bad = ~torch.isfinite(value) & (self.first_nonfinite < 0)
            self.first_nonfinite = torch.where(bad, torch.full_like(self.first_nonfinite, step),
                                               self.first_nonfinite)
        self.optimizer.zero_grad(set_to_none=True)
        if not nonfinite:
            loss.backward()
            self.optimizer.step()
        return value, stats, stopping

    def _inputs(self, batch: dict) -> tuple:
        """The model's arguments before the step: every view augmented (in the spec's view order: the
        augmentation draws depend on it) and the matched pairs (``MoCo.forward``)."""
        views, pairs = matched_views(batch, self.spec)
        augmented = {name: self.augment(v, self.augment_gen).contiguous(memory_format=self.memory_format)
                     for name, v in views.items()}
        return augmented, pairs

    def _skip_or_raise(self, value: float, step: int, indices: torch.Tensor, undo: dict | None) -> None:
        """A non-finite loss: save the batch's indices, then undo the forward's side effects (on_nonfinite=skip,
        up to max_nonfinite_skips) or stop the run."""
        report = self.run_dir / f"nonfinite_step{step + 1}_rank{self.rank}.json"
        report.write_text(json.dumps({"step": step + 1, "loss": str(value), "rank": self.rank,
                                      "indices": indices.tolist()}))
        if undo is None or self.nonfinite_skips >= self.cfg.run.max_nonfinite_skips:
            raise FloatingPointError(
                f"loss is not finite at step {step + 1} (this rank's loss {value}; {self.nonfinite_skips} earlier "
                f"step(s) skipped); batch indices saved to {report}; run.resume=auto restarts from the last "
                "checkpoint")
        self.model.load_state_dict(undo, strict=False)  # un-enqueue keys, undo the momentum update
        self.nonfinite_skips += 1
        if self.rank == 0:
            print(f"skipped step {step + 1}: loss not finite (batch indices in {report})", flush=True)

    def resume(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"][self.rank], self.augment_gen)

    def save(self, ckpt_dir: Path, loader: ViewLoader, step: int) -> None:
        """Every rank's RNG and loader state goes into rank 0's checkpoint, so a resumed run draws the same
        batches and augmentations; ``model_config`` lets evaluation rebuild the model from the file alone."""
        rngs = distributed.gather_objects(rng_state(self.augment_gen), self.world)
        loader_states = distributed.gather_objects(loader.state_dict(), self.world)
        if self.rank == 0:
            model = self.model
            checkpoint.save({"model": model.state_dict(), "model_config": model_config(model.cfg, model.method_cfg),
                             "optimizer": self.optimizer.state_dict(), "epoch": loader_states[0]["epoch"],
                             "step_in_epoch": loader_states[0]["batch"], "global_step": step, "rng": rngs,
                             "loader_states": loader_states, "config": to_dict(self.cfg)},
                            ckpt_dir, step, self.cfg.run.keep_checkpoints)
        distributed.barrier(self.world)


def draws(batch: dict) -> torch.Tensor:
    """The draws each view needed, every group's ``tries/<group>`` (a pair's two views share their count)."""
    return torch.cat([v for k, v in batch.items() if k.startswith("tries/")], 1)


def resume_same_step(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> tuple[dict, Path] | None:
    """The checkpoint every rank resumes from: rank 0 claims the run folder and chooses it (``run_folder.start``),
    every other rank loads that same file. A rank that cannot (a refused folder, an unreadable file, an error of
    its machine) stops the job on every rank with one line: ranks that resumed different steps would train on."""
    resumed = chosen = refusal = failure = None
    if rank == 0:
        try:
            resumed = run_folder.start(cfg)
            chosen = resumed and str(resumed[1])
        except (ConfigError, checkpoint.CheckpointError, OSError, MemoryError) as err:
            refusal = f"{err}"
    chosen, refusal = distributed.gather_objects((chosen, refusal), world)[0]
    if refusal is not None:
        raise ConfigError(refusal if rank == 0 else f"rank 0 stopped the start: {refusal}")
    if rank != 0 and chosen is not None:
        try:
            resumed = checkpoint.read(chosen), Path(chosen)
        except (checkpoint.CheckpointError, OSError, MemoryError) as err:
            failure = f"{err}"
    if distributed.agree([failure is not None], world, device)[0]:
        raise ConfigError(f"rank {rank} could not read {chosen}, the checkpoint rank 0 resumes: {failure}" if failure
                          else f"another rank could not read {chosen}, the checkpoint rank 0 resumes (see its log)")
    return resumed


def saved_loader_state(state: dict | None, rank: int, world: int) -> dict | None:
    """This rank's loader state in a checkpoint, when the world size is unchanged."""
    states = (state or {}).get("loader_states") or []
    if states and len(states) != world:
        if rank == 0:
            warnings.warn(f"the checkpoint holds loader states of {len(states)} ranks, this run has {world}: the "
                          "loader continues from the checkpoint's epoch and batch, and a backend whose reader keeps "
                          "its own state sees other batches there than the first run")
        return None
    return states[rank] if states else None


@dataclass
class TrainResult:
    model: MoCo  # unwrapped, on the training device
    step: int  # steps done when run returned
    total: int
    stopped: bool  # a stop was requested (preemption, time limit) and honoured: checkpointed before the end


def run(cfg: TrainConfig) -> TrainResult:
    """Train per ``cfg``. Safe to call again after a crash with run.resume=auto."""
    # --- set-up: processes, run folder, the checkpoint to resume from
    try:
        rank, world, device = distributed.setup(cfg.run.device, cfg.run.collective_timeout_s)
    except ValueError as err:
        raise ConfigError(f"run.{err}") from None
    cfg.validate(world)
    run_dir = Path(cfg.run.dir)
    ckpt_dir = run_dir / "checkpoints"
    resumed = resume_same_step(cfg, rank, world, device)

    # --- data, model, optimiser
    try:
        root = cfg.data.prepare(run_dir, write=rank == 0, progress=cfg.run.progress)
    except owned.NotOurs as err:
        raise ConfigError(f"data.{err}") from None
    distributed.barrier(world)
    loader_state = saved_loader_state(resumed and resumed[0], rank, world)
    try:  # the folder's index, once: cached for every rank and requeue, and never rescanned by a rebuild
        data = cfg.data.source(root)
    except owned.NotOurs as err:  # the index folder: the message names data.index_dir
        raise ConfigError(f"{err}") from None
    except (FileNotFoundError, ValueError) as err:  # no images, an unreadable file list
        raise ConfigError(f"data.path={cfg.data.path!r}: {err}") from None

    def build(state):  # the loader at a position (RestartingLoader rebuilds it there when a worker dies)
        return build_loader(cfg.data.backend, data, cfg.view_spec(), batch_size=cfg.optim.batch_size // world,
                            workers=cfg.data.workers, seed=cfg.run.seed, rank=rank, world_size=world, device=device,
                            state=state, skip_log=str(run_dir / "skipped.txt"), order=cfg.data.order)
    try:
        loader = RestartingLoader(build, loader_state, cfg.run.max_loader_restarts,
                                  log=lambda line: print(f"rank {rank}: {line}", flush=True))
    except (FileNotFoundError, ValueError) as err:  # the data itself: no images, fewer than one batch, ...
        raise ConfigError(f"data.path={cfg.data.path!r}: {err}") from None
    total = cfg.optim.steps or cfg.optim.epochs * len(loader)
    model = build_model(cfg, device, world)
    trainer = Trainer(cfg, model, rank, world, device, total)
    iteration = 0  # steps done; the loader's position is the truth for epoch and batch
    if resumed is not None:
        state, path = resumed
        trainer.resume(state)
        iteration = state["global_step"]
        if loader_state is None:  # another world size: the loader starts at the checkpoint's epoch and batch
            loader.set_epoch(state["epoch"], state["step_in_epoch"])
        if rank == 0:
            print(f"resumed from {path} at step {iteration} (epoch {loader.epoch}, batch {loader.batch})")
    trainer.wrap()

    # --- monitoring (rank 0): metrics.csv, TensorBoard, console
    monitor = None
    if rank == 0:
        pictures = cfg.run.tensorboard and cfg.run.log_images
        images = preview_images(data, cfg.run.log_images, cfg.view_sizes()[0][0]) if pictures else None
        keys = cfg.optim.batch_size * model.method.keys_per_sample(cfg.view_spec())
        monitor = Monitor(cfg, keys, total, iteration, images)
    heartbeat = distributed.Heartbeat(run_dir, rank, world)

    # --- the loop: one counter; each pass over the loader is the rest of an epoch
    stopping = False
    every = cfg.run
    with healing.failures_name_their_step(lambda: iteration + 1), heartbeat.names_stuck_ranks():
        while iteration < total and not stopping:
            start = time.perf_counter()
            for batch in loader:
                loaded = time.perf_counter()
                lrs = trainer.set_learning_rates(iteration)
                due = iteration + 1  # the step about to be done (1-based)
                sync = due % every.sync_every == 0 or due % every.checkpoint_every == 0 or due == total
                value, stats, stopping = trainer.step(batch, iteration, sync)
                iteration += 1
                # monitoring
                now = time.perf_counter()
                if monitor is not None:
                    epoch = loader.epoch + (loader.batch >= len(loader))
                    monitor.step(iteration, epoch, value, lrs, cfg.optim.batch_size / (now - start),
                                 (loaded - start) / (now - start), stats, draws(batch), trainer.model)
                    if sync:
                        monitor.flush()
                heartbeat.beat(iteration)
                # checkpoint
                if iteration % every.checkpoint_every == 0 or iteration == total or stopping:
                    trainer.save(ckpt_dir, loader, iteration)
                if stopping and rank == 0:
                    print(f"stop requested: checkpointed step {iteration} of {total}", flush=True)
                if iteration == total or stopping:
                    break
                start = time.perf_counter()

    # --- wrap-up
    if monitor is not None:
        monitor.close(iteration, stopping)
    if stopping:
        distributed.clear_stop()  # honoured: a later run in this process starts without it
    return TrainResult(trainer.model, iteration, total, stopping)


def main(argv=None) -> None:
    from .config import parse

    signal.signal(signal.SIGUSR2, distributed.request_stop)  # e.g. sbatch --signal=USR2@120: checkpoint first
    try:
        run(parse(argv))
    except (ConfigError, checkpoint.CheckpointError, healing.GaveUp) as err:  # one line, no traceback
        raise SystemExit(f"error: {err}") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
