"""Launch training on Slurm (or on this machine) with submitit: one task per GPU, requeued on preemption, time-out
and crashes.

    python -m densessl.slurm.submit --nodes 2 --gpus-per-node 8 --partition gpu --time 4320 -- \\
        data.path=/data/imagenet/train optim.batch_size=256
    python -m densessl.slurm.submit --local --tasks-per-node 2 -- model.arch=resnet18 optim.steps=20

Everything after ``--`` is passed to the trainer (``python -m densessl.train`` syntax). Without ``run.dir``, each
submission gets a new folder of its own under ``--job-dir``. The job's first start resumes as ``run.resume`` says
(default ``auto``: continue the run ``run.dir`` holds, if any); its requeued starts continue from the run's own
newest checkpoint (``run.resume`` again while it has none). Slurm sends SIGUSR2
``--signal-delay`` seconds before the time limit (and ``scancel --signal=USR2 JOB`` does the same by hand, as a
preemption notice would): every rank finishes its step, the ranks agree on the step to stop at, a checkpoint is
written, and rank 0 requeues the job. When a rank crashes (killed, lost, timed out), a rank that survives
requeues the job, at most ``run.max_restarts`` times (``train.healing`` says what is retried)."""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import submitit

from densessl.train import healing, run_folder

# Slurm states after which a job will not produce results (no sacct needed: scontrol knows recent jobs).
ENDED = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def weights_digest(model) -> str:
    """A short hash of the weights and the MoCo queues: equal on every rank when DDP kept them in sync.

    BatchNorm running statistics are left out: under shuffle-BN each rank keeps its own (as in MoCo; the
    checkpoint holds rank 0's), and they only matter for evaluation.
    """
    h = hashlib.sha256()
    per_rank = ("running_mean", "running_var", "num_batches_tracked")
    for name, t in sorted(model.state_dict().items()):
        if name.endswith(per_rank):
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class TrainJob(submitit.helpers.Checkpointable):
    """The submitted callable: sets up torch.distributed from Slurm's variables and runs the trainer.

    A ``Checkpointable``, so if submitit's own handler sees the signal first (before ``__call__`` replaces it) the
    job is still requeued with the same arguments; resume=auto makes that safe.
    """

    def __init__(self, train_args: list[str]):
        self.train_args = list(train_args)

    def __call__(self) -> dict:
        import torch.distributed as dist

        from densessl.train import distributed, trainer
        from densessl.train.config import parse

        env = submitit.JobEnvironment()
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        # Our handler only raises a flag: the checkpoint is written at a step boundary by every rank together.
        signal.signal(signal.SIGUSR2, distributed.request_stop)
        print(f"rank {env.global_rank}/{env.num_tasks} on {env.hostname} (job {env.job_id}); "
              f"master {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", flush=True)
        cfg = parse(self.train_args + start_args(self.train_args, os.environ.get("SLURM_RESTART_COUNT", "0")))
        restarts = healing.Restarts(cfg.run.dir, cfg.run.max_restarts)
        done = restarts.done()
        if done and env.global_rank == 0:
            print(f"restart {len(done)} of at most {cfg.run.max_restarts} (run.max_restarts), after "
                  f"{done[-1]['cause']} at step {done[-1]['step']}", flush=True)
        try:
            result = trainer.run(cfg)
        except Exception as err:
            self._heal_or_fail(env, restarts, err)
            raise
        try:
            digest = weights_digest(result.model)
            print(f"final weights digest {digest}", flush=True)
            if result.stopped:
                self._requeue(env)
            return {"rank": env.global_rank, "digest": digest, "run_dir": cfg.run.dir}
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()

    @staticmethod
    def _heal_or_fail(env, restarts: healing.Restarts, err: Exception) -> None:
        """A crash on Slurm (``healing``): the rank that claims it requeues the job and leaves, the other
        survivors wait for Slurm to end them; or the job fails with the reason. Off Slurm the caller re-raises."""
        if env.cluster != "slurm":
            return
        attempt = os.environ.get("SLURM_RESTART_COUNT", "0")
        action, value = restarts.handle(env.job_id, attempt, env.global_rank, err, healing.failed_step(err))
        cause = f"rank {env.global_rank}: {healing.first_line(err)} at step {healing.failed_step(err)}"
        if action == "fail":
            raise RuntimeError(value) from err
        if action == "requeue":
            print(f"{cause}; restart {value} of at most {restarts.limit}: requeueing job {env.job_id}", flush=True)
            done = subprocess.run(["scontrol", "requeue", env.job_id], capture_output=True, text=True, timeout=60)
            if done.returncode != 0:
                restarts.release(env.job_id, attempt)
                raise RuntimeError(f"could not requeue job {env.job_id} ({done.stderr.strip()}) after {cause}") from err
        else:
            print(f"{cause}; another rank requeues job {env.job_id}", flush=True)
            time.sleep(60)  # Slurm ends this task when it requeues the job; exiting first could end the job
        sys.stderr.flush()
        os._exit(1)  # no result file (the requeued job writes it) and no teardown of a broken process group

    @staticmethod
    def _requeue(env) -> None:
        """Rank 0 requeues before anyone exits (a task that exits first could end the job); all ranks then exit
        without a result, so watchers keep waiting for the requeued run's."""
        import torch.distributed as dist

        if env.global_rank == 0:
            if env.cluster == "slurm":
                subprocess.run(["scontrol", "requeue", env.job_id], check=True, timeout=60)
                print(f"requeued job {env.job_id}", flush=True)
            else:
                print("stopped on request; not on Slurm, so not requeued (relaunch to resume)", flush=True)
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        if env.cluster == "slurm":
            sys.exit(-1)


def start_args(train_args: list[str], restart_count: str) -> list[str]:
    """What a start of the job adds to the trainer's arguments. The first start honours the user's
    ``run.resume`` (``auto`` when not given) and ``run.overwrite``. A requeued start (``SLURM_RESTART_COUNT`` > 0)
    continues the run's own newest checkpoint, or, while it has none, starts as the first did; it never
    overwrites (that would drop the steps the first start made)."""
    from densessl.model.checkpoint import checkpoints
    from densessl.train.config import parse

    cfg = parse(train_args)
    resume = cfg.run.resume or "auto"
    if int(restart_count or 0) == 0:
        return [f"run.resume={resume}"]
    if checkpoints(Path(cfg.run.dir) / "checkpoints"):
        resume = "auto"
    return [f"run.resume={resume}", "run.overwrite=false"]


def slurm_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    for field in out.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return "UNKNOWN"


def _result(task):
    outcome, value = submitit.core.utils.pickle_load(task.paths.result_pickle)
    if outcome != "success":
        raise RuntimeError(f"task {task.task_id} of job {task.job_id} failed:\n{value}")
    return value


def _errors(tasks) -> str:
    """'': or each failed task's error, the last line of its traceback (what a rank gave up on)."""
    said = []
    for t in tasks:
        if t.paths.result_pickle.exists():
            outcome, value = submitit.core.utils.pickle_load(t.paths.result_pickle)
            if outcome != "success":
                said.append(f"rank {t.task_id}: {str(value).strip().splitlines()[-1]}")
    return "".join(f"; {line}" for line in said)


def wait(job, timeout_s: float, poll_s: float = 1.0) -> list:
    """Every task's result, or an error naming the logs. Bounded, and reads results and Slurm's own job record
    (scontrol) directly: without accounting there is no sacct, and submitit alone would wait forever on a job
    that was cancelled or killed, since no result file ever appears."""
    tasks = [job.task(i) for i in range(job.num_tasks)]
    deadline = time.monotonic() + timeout_s
    ended_at = None
    while time.monotonic() < deadline:
        if all(t.paths.result_pickle.exists() for t in tasks):
            return [_result(t) for t in tasks]
        if isinstance(job, submitit.SlurmJob) and slurm_state(job.job_id) in ENDED:
            ended_at = ended_at or time.monotonic()
            if time.monotonic() - ended_at > 10:  # results of tasks that did finish have had time to land
                raise RuntimeError(f"job {job.job_id} ended {slurm_state(job.job_id)} without results from every "
                                   f"rank{_errors(tasks)}; see the logs in {job.paths.folder}")
        time.sleep(poll_s)
    raise TimeoutError(f"job {job.job_id} not finished after {timeout_s:.0f} s; it keeps running "
                       f"(logs in {job.paths.folder})")


def build_executor(args) -> submitit.Executor:
    tasks = args.gpus_per_node or args.tasks_per_node
    folder = Path(args.job_dir) / "%j"
    if args.local:
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(nodes=1, tasks_per_node=tasks, gpus_per_node=args.gpus_per_node,
                                   timeout_min=args.time, signal_delay_s=args.signal_delay)
        return executor
    executor = submitit.SlurmExecutor(folder=folder)
    optional = {"partition": args.partition, "account": args.account, "qos": args.qos,
                "constraint": args.constraint, "mem": args.mem, "exclusive": True if args.exclusive else None}
    executor.update_parameters(
        job_name=args.name, nodes=args.nodes, ntasks_per_node=tasks, cpus_per_task=args.cpus_per_task,
        gpus_per_node=args.gpus_per_node or None, time=args.time, signal_delay_s=args.signal_delay,
        # requeue: Slurm requeues the job itself after a node failure; kill-on-bad-exit=0: the ranks that survive
        # a crashed one live on to requeue the job (train.healing), whatever the cluster's default
        additional_parameters={"requeue": True}, srun_args=["--kill-on-bad-exit=0"],
        **{k: v for k, v in optional.items() if v is not None})
    return executor


def parse_args(argv: list[str]):
    if "--" in argv:
        i = argv.index("--")
        own, train_args = argv[:i], argv[i + 1:]
    else:
        own, train_args = argv, []
    p = argparse.ArgumentParser(prog="python -m densessl.slurm.submit", description=__doc__.split("\n\n")[0],
                                epilog="Trainer arguments (section.key=value) follow `--`.")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="one task per GPU; 0 = CPU tasks")
    p.add_argument("--tasks-per-node", type=int, default=1, help="CPU tasks per node (ignored with GPUs)")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--constraint", help="node features, e.g. 'a100|h100'")
    p.add_argument("--exclusive", action="store_true", help="whole nodes only")
    p.add_argument("--mem", help="memory per node, e.g. 200G (0 = all)")
    p.add_argument("--time", type=int, default=60, help="time limit in minutes")
    p.add_argument("--signal-delay", type=int, default=120,
                   help="seconds before the limit at which SIGUSR2 asks for a checkpoint and requeue")
    p.add_argument("--name", default="densessl")
    p.add_argument("--job-dir", default="runs/slurm", help="submitit folder: one subfolder per job")
    p.add_argument("--local", action="store_true", help="run on this machine with submitit's local executor")
    p.add_argument("--wait", action="store_true", help="block until the job ends and print each rank's result")
    p.add_argument("--wait-timeout", type=float, default=24 * 3600)
    args = p.parse_args(own)
    if args.nodes < 1 or args.tasks_per_node < 1 or args.gpus_per_node < 0:
        p.error("--nodes and --tasks-per-node must be >= 1, --gpus-per-node >= 0")
    if args.local and args.nodes != 1:
        p.error("--local runs on this machine: use --nodes 1")
    if any("=" not in a for a in train_args):
        p.error(f"trainer arguments must be section.key=value, got {[a for a in train_args if '=' not in a]}")
    return args, train_args


def own_run_dir(args, train_args: list[str]) -> list[str]:
    """``train_args`` with a ``run.dir`` of this submission's own when none is given: a new folder under
    ``--job-dir``, created atomically, so two submissions in the same second never share one."""
    if any(a.startswith("run.dir=") for a in train_args):
        return train_args
    jobs = Path(args.job_dir).resolve()
    jobs.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return train_args + [f"run.dir={tempfile.mkdtemp(prefix=f'{args.name}-{stamp}-', dir=jobs)}"]


def submit(argv: list[str]):
    """Submit; returns (job, run_dir). Validates the trainer config first, so mistakes fail here, not in the queue."""
    from densessl.train.config import parse

    args, train_args = parse_args(argv)
    tasks = (args.gpus_per_node or args.tasks_per_node) * args.nodes
    parse(train_args).validate(world_size=tasks)
    train_args = own_run_dir(args, train_args)
    run_folder.check(parse(train_args + start_args(train_args, "0")))  # not in the queue: that it holds another run
    job = build_executor(args).submit(TrainJob(train_args))
    run_dir = next(a.split("=", 1)[1] for a in train_args if a.startswith("run.dir="))
    per_node = args.gpus_per_node or args.tasks_per_node
    folder = job.paths.folder
    lines = [f"submitted job {job.job_id}: {args.nodes} node(s) x {per_node} task(s)"
             f"{' (one GPU each)' if args.gpus_per_node else ''}, {args.time} min limit",
             f"  job folder  {folder}",
             f"  rank logs   {folder}/{job.job_id}_<rank>_log.out|err",
             f"  run folder  {run_dir}  (checkpoints, metrics.csv, config.yaml)",
             f"  follow      tail -f {folder}/{job.job_id}_0_log.err   (a line every run.log_every steps)",
             f"  TensorBoard tensorboard --logdir {run_dir}/tensorboard"]
    if not args.local:
        lines += [f"  preempt     scancel --signal=USR2 {job.job_id}   (checkpoint + requeue)",
                  f"  cancel      scancel {job.job_id}"]
    print("\n".join(lines), flush=True)
    if args.wait:
        for result in wait(job, args.wait_timeout):
            print(result)
    return job, run_dir


def main(argv: list[str] | None = None) -> None:
    try:
        submit(list(sys.argv[1:] if argv is None else argv))
    except (ValueError, RuntimeError, TimeoutError, subprocess.CalledProcessError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
