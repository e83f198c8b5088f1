"""The Slurm launcher against a real Slurm (slurm/local_cluster.sh: controller + two nodes on loopback)."""

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

if not os.environ.get("DENSESSL_REQUIRE_BACKENDS"):
    pytest.importorskip("submitit")  # a core dependency; missing only where the project is not installed

from densessl.slurm.submit import slurm_state, submit, wait  # noqa: E402

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
