"""The Slurm launcher against a real Slurm (slurm/local_cluster.sh: controller + two nodes on loopback)."""

import json
import os
import random
import re
import signal
import shutil
import subprocess
import time
from pathlib import Path

import pytest

if not os.environ.get("DENSESSL_REQUIRE_BACKENDS"):
    pytest.importorskip("submitit")  # a core dependency; missing only where the project is not installed

from densessl.slurm.submit import slurm_state, submit, wait  # noqa: E402
from densessl.train.healing import Restarts  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "slurm" / "local_cluster.sh"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n", "--preserve-env=DENSESSL_SLURM_DIR"]
    can_sudo = not sudo or subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0
    if not can_sudo or not shutil.which("apt-get"):
        if os.environ.get("DENSESSL_REQUIRE_BACKENDS"):
            pytest.fail("the Slurm tests need root (or passwordless sudo) and apt-get")
        pytest.skip("the local Slurm cluster needs root (or passwordless sudo) and apt-get")
    env = {**os.environ, "DENSESSL_SLURM_DIR": str(tmp_path_factory.mktemp("slurm"))}
    up = subprocess.run([*sudo, "bash", str(CLUSTER), "up"], env=env, capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, up.stderr
    conf = re.search(r"export SLURM_CONF=(\S+)", up.stdout).group(1)
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield conf
    subprocess.run([*sudo, "bash", str(CLUSTER), "down"], env=env, timeout=120)
    os.environ.pop("SLURM_CONF") if old is None else os.environ.update(SLURM_CONF=old)


def train_args(synthetic_root, steps, every):
    return [f"data.path={synthetic_root / 'train'}", "model.arch=resnet18", "views.size=64", "optim.batch_size=8",
            "data.workers=1", "method.queue_size=256", "views.num_matches=8", "views.min_matches=8",
            f"optim.steps={steps}", "run.progress=false", f"run.checkpoint_every={every}", "optim.lr=0.1",
            "optim.decoder_lr=0.1"]


def logged_steps(run_dir):
    rows = (Path(run_dir) / "metrics.csv").read_text().splitlines()[1:]
    return [int(r.split(",")[0]) for r in rows]


def test_two_nodes_train_in_step(cluster, synthetic_root, tmp_path):
    job, run_dir = submit(["--nodes", "2", "--time", "10", "--job-dir", str(tmp_path), "--",
                           *train_args(synthetic_root, 4, 2)])
    results = wait(job, timeout_s=300)
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert len({r["digest"] for r in results}) == 1, results  # weights and MoCo queues identical on both ranks
    assert logged_steps(run_dir) == [1, 2, 3, 4]
    assert (Path(run_dir) / "checkpoints" / "step_00000004.pt").exists()
    deadline = time.monotonic() + 60  # the tasks exit just after writing their results
    while slurm_state(job.job_id) != "COMPLETED":
        assert time.monotonic() < deadline, slurm_state(job.job_id)
        time.sleep(0.5)


def test_preempted_job_checkpoints_requeues_and_resumes(cluster, synthetic_root, tmp_path):
    steps = 40
    job, run_dir = submit(["--nodes", "2", "--time", "10", "--job-dir", str(tmp_path), "--",
                           *train_args(synthetic_root, steps, 100)])
    metrics = Path(run_dir) / "metrics.csv"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(logged_steps(run_dir)) >= 3):
        assert time.monotonic() < deadline, "training did not start"
        assert slurm_state(job.job_id) in ("PENDING", "CONFIGURING", "RUNNING"), slurm_state(job.job_id)
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)  # what a preemption notice sends
    results = wait(job, timeout_s=300)
    log = (tmp_path / job.job_id / f"{job.job_id}_0_log.out").read_text()
    stopped = int(re.search(r"stop requested: checkpointed step (\d+)", log).group(1))
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", log).group(1))
    assert 3 <= stopped == resumed < steps
    assert "Restarts=1" in subprocess.run(["scontrol", "show", "job", job.job_id], capture_output=True,
                                          text=True).stdout
    assert logged_steps(run_dir) == list(range(1, steps + 1)), "a step was repeated or skipped"
    assert len({r["digest"] for r in results}) == 1


def rank_process(job_id: str, rank: int) -> int | None:
    """The pid of a rank's training process (submitit's task) of a job's current run, found by its Slurm
    variables (the two nodes are this host)."""
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if b"submitit.core._submit" not in argv or Path(argv[0].decode()).name == "srun":
                continue
            env = dict(v.split(b"=", 1) for v in (proc / "environ").read_bytes().split(b"\0") if b"=" in v)
        except (OSError, ValueError):
            continue
        if env.get(b"SLURM_JOB_ID") == job_id.encode() and env.get(b"SLURM_PROCID") == str(rank).encode():
            return int(proc.name)
    return None


def wait_for_step(run_dir, step, job, timeout_s=300):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if max(logged_steps(run_dir), default=0) >= step:
                return time.monotonic()
        except (FileNotFoundError, ValueError):
            pass
        assert time.monotonic() < deadline, f"step {step} not reached; job {slurm_state(job.job_id)}"
        assert slurm_state(job.job_id) not in ("FAILED", "CANCELLED", "COMPLETED"), slurm_state(job.job_id)
        time.sleep(0.1)


@pytest.mark.slow
def test_a_killed_rank_requeues_the_job_which_ends_as_the_unbroken_run(cluster, synthetic_root, tmp_path):
    """SIGKILL to one rank's training process at two random moments (rank 0, which holds the rendezvous store,
    then rank 1): each time the surviving rank requeues the job, which resumes from the newest checkpoint and
    ends with the weights and queues of an unbroken run of the same seed."""
    steps, every = 60, 4
    ref_job, _ = submit(["--local", "--tasks-per-node", "2", "--job-dir", str(tmp_path / "ref"), "--",
                         *train_args(synthetic_root, steps, 100)])
    unbroken = {r["digest"] for r in wait(ref_job, timeout_s=600)}
    assert len(unbroken) == 1

    job, run_dir = submit(["--nodes", "2", "--time", "10", "--job-dir", str(tmp_path / "jobs"), "--",
                           *train_args(synthetic_root, steps, every)])
    moments = random.Random().sample(range(every + 1, steps - 20), 2)  # after a checkpoint, well before the end
    first = min(moments)
    second = max(max(moments), first + every + 2)  # after the first restart has trained past a checkpoint
    lost, recoveries = [], []
    for rank, moment in ((0, first), (1, second)):
        wait_for_step(run_dir, moment, job)
        pid = rank_process(job.job_id, rank)
        assert pid, f"no process for rank {rank} of job {job.job_id}"
        done = max(logged_steps(run_dir))
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        log = Path(run_dir) / "restarts"
        while len(list(log.glob("*.json"))) < len(lost) + 1:
            assert time.monotonic() - killed < 120, "no rank requeued the job"
            time.sleep(0.1)
        record = json.loads(sorted(log.glob("*.json"), key=lambda p: p.stat().st_mtime)[-1].read_text())
        assert record["cause"].startswith("RuntimeError: a collective operation failed"), record
        while len(resumed_at(job, tmp_path)) <= len(lost):  # the requeued run has loaded its checkpoint
            assert time.monotonic() - killed < 300, f"job not resumed after the kill of rank {rank}"
            time.sleep(0.1)
        start, seen = resumed_at(job, tmp_path)[-1], time.time()
        lost.append(done - start)
        metrics = Path(run_dir) / "metrics.csv"
        while not (metrics.stat().st_mtime >= seen and logged_steps(run_dir)[-1:] > [start]):  # training again
            assert time.monotonic() - killed < 300, f"no step after the resume at step {start}"
            time.sleep(0.05)
        recoveries.append(time.monotonic() - killed)
    results = wait(job, timeout_s=600)
    out = (tmp_path / "jobs" / job.job_id / f"{job.job_id}_0_log.out").read_text()
    assert len(resumed_at(job, tmp_path)) == 2 and all(0 <= n <= every for n in lost), lost
    assert "restart 2 of at most 3 (run.max_restarts)" in out
    assert logged_steps(run_dir) == list(range(1, steps + 1)), "a step was repeated or skipped"
    assert {r["digest"] for r in results} == unbroken, (results, unbroken)
    print(f"kills at steps {first} and {second}: lost {lost} steps; kill to training again "
          f"{', '.join(f'{t:.1f}' for t in recoveries)} s")


def resumed_at(job, tmp_path) -> list[int]:
    """The steps the job's runs resumed at, from rank 0's log (appended to by every run of the job)."""
    path = tmp_path / "jobs" / job.job_id / f"{job.job_id}_0_log.out"
    return [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", path.read_text())] if path.exists() else []


@pytest.mark.slow
def test_retries_run_out_and_a_configuration_error_does_not_loop(cluster, synthetic_root, tmp_path):
    job, run_dir = submit(["--nodes", "2", "--time", "10", "--job-dir", str(tmp_path / "a"), "--",
                           *train_args(synthetic_root, 200, 100), "run.max_restarts=0"])
    wait_for_step(run_dir, 2, job)
    os.kill(rank_process(job.job_id, 1), signal.SIGKILL)
    with pytest.raises(RuntimeError, match=r"gave up after 0 restart\(s\) \(run.max_restarts=0\); last cause at "
                                           r"step \d+: RuntimeError: a collective operation failed"):
        wait(job, timeout_s=300)
    assert "Restarts=0" in subprocess.run(["scontrol", "show", "job", job.job_id], capture_output=True,
                                          text=True).stdout

    (tmp_path / "no_images" / "a").mkdir(parents=True)  # found only when the job builds its loader
    (tmp_path / "no_images" / "a" / "notes.txt").write_text("no image here")
    job, run_dir = submit(["--nodes", "2", "--time", "10", "--job-dir", str(tmp_path / "b"), "--",
                           *train_args(synthetic_root, 4, 2), f"data.path={tmp_path / 'no_images'}"])
    with pytest.raises(RuntimeError, match="ConfigError: data.path="):
        wait(job, timeout_s=300)
    assert "Restarts=0" in subprocess.run(["scontrol", "show", "job", job.job_id], capture_output=True,
                                          text=True).stdout
    assert Restarts(run_dir, 3).done() == []  # no requeue recorded; each rank left its deterministic failure
    fatal = [json.loads(p.read_text()) for p in (Path(run_dir) / "restarts").glob("fatal.*.json")]
    assert fatal and fatal[0]["cause"].startswith("ConfigError: data.path="), fatal


def test_local_executor_runs_two_tasks(synthetic_root, tmp_path):
    job, run_dir = submit(["--local", "--tasks-per-node", "2", "--job-dir", str(tmp_path), "--",
                           *train_args(synthetic_root, 2, 2)])
    results = wait(job, timeout_s=300)
    assert len(results) == 2 and len({r["digest"] for r in results}) == 1


def test_failed_job_is_reported_not_waited_on(cluster, tmp_path):
    job, _ = submit(["--nodes", "1", "--time", "10", "--job-dir", str(tmp_path), "--", "data.path=synthetic",
                     "optim.steps=1", "model.arch=resnet18"])
    subprocess.run(["scancel", job.job_id], check=True)  # killed: no result file will ever appear
    with pytest.raises(RuntimeError, match="ended CANCELLED"):
        wait(job, timeout_s=120)


def test_bad_arguments_fail_before_submitting(tmp_path):
    with pytest.raises(SystemExit):
        submit(["--local", "--nodes", "2", "--job-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="not divisible by the world size 3"):
        submit(["--local", "--tasks-per-node", "3", "--job-dir", str(tmp_path), "--", "optim.batch_size=8"])
    assert not any(tmp_path.iterdir())
