"""What a run survives by itself (train.healing): a killed loader worker, and the rules for requeueing a crash.
The crash requeue on the real local Slurm cluster is in test_slurm.py."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from densessl.model.checkpoint import CheckpointError
from densessl.train.config import ConfigError
from densessl.train.healing import Restarts, first_line
from runs import REPO, losses, run_train, tiny_args


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(c) for c in (task / "children").read_text().split()]
    return kids


def _progress(run_dir: Path) -> int:
    try:
        return max(losses(run_dir), default=0)
    except (FileNotFoundError, ValueError, KeyError):
        return 0


@pytest.mark.slow
def test_a_killed_loader_worker_is_replaced_and_the_run_sees_the_same_batches(synthetic_root, tmp_path):
    steps = 10
    extra = {"optim.steps": steps, "run.checkpoint_every": 100, "data.workers": 2}
    ref = run_train(tiny_args(synthetic_root, tmp_path / "ref", **extra))
    assert ref.returncode == 0, ref.stderr[-2000:]
    proc = subprocess.Popen([sys.executable, "-m", "densessl.train", *tiny_args(synthetic_root, tmp_path / "cut",
                                                                                    **extra)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while _progress(tmp_path / "cut") < 3:
        assert proc.poll() is None and time.time() < deadline, "training ended before a worker could be killed"
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert len(workers) >= 2, workers
    os.kill(workers[0], signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert re.search(r"loader rebuilt at epoch \d+, batch \d+ after .*restart 1 of at most 3 this epoch", out), out
    assert "killed by signal" in out or "exited unexpectedly" in out, out[-3000:]
    want, got = losses(tmp_path / "ref"), losses(tmp_path / "cut")
    assert sorted(got) == list(range(1, steps + 1)), "a step was lost or repeated"
    for step in range(1, steps + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-4), f"step {step}"


def test_loader_restarts_are_bounded(synthetic_root, tmp_path):
    """With run.max_loader_restarts=0 a dead worker ends the run, saying so."""
    proc = subprocess.Popen([sys.executable, "-m", "densessl.train", *tiny_args(
        synthetic_root, tmp_path / "run", **{"optim.steps": 40, "run.max_loader_restarts": 0})],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while _progress(tmp_path / "run") < 2:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    os.kill(_children(proc.pid)[0], signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert re.fullmatch(r"error: a loader worker died 1 time\(s\) in epoch \d+ \(run.max_loader_restarts=0\); last: "
                        r"RuntimeError: DataLoader worker \(pid.*\n", out.splitlines(keepends=True)[-1]), out[-3000:]
    assert "Traceback" not in out


def _crash(message="a collective operation failed on rank 1 (Connection closed by peer): rank 0 silent for 7 s"):
    return RuntimeError(message)


def test_deterministic_failures_are_not_retried(tmp_path):
    restarts = Restarts(tmp_path, limit=3)
    for k, err in enumerate((ConfigError("data.path='x': no images"), CheckpointError("truncated"),
                             FloatingPointError("loss is not finite at step 5"),
                             RuntimeError("more than data.max_bad_images=10 unreadable images were skipped"))):
        action, reason = restarts.handle("7", str(k), 0, err, 5)
        assert action == "fail" and reason.startswith("not restarted: a deterministic failure"), err
    assert restarts.done() == []
    assert restarts.handle("7", "9", 0, _crash(), 5) == ("requeue", 1)


def test_a_crash_is_claimed_once_per_job_attempt_and_retries_run_out(tmp_path):
    restarts = Restarts(tmp_path, limit=2)
    assert restarts.handle("7", "0", 1, _crash(), 4) == ("requeue", 1)
    assert restarts.handle("7", "0", 2, _crash(), 4) == ("defer", None)  # another survivor of the same crash
    assert restarts.handle("7", "1", 0, _crash("... rank 0 silent for 9 s"), 11) == ("requeue", 2)
    action, reason = restarts.handle("7", "2", 1, _crash(), 17)
    assert action == "fail" and reason.startswith(
        "gave up after 2 restart(s) (run.max_restarts=2); last cause at step 17: RuntimeError: a collective "
        "operation failed"), reason
    assert restarts.handle("7", "2", 2, _crash(), 17)[0] == "fail"  # the claim was released; the same verdict
    assert [r["step"] for r in Restarts(tmp_path, 2).done()][:2] == [4, 11]
    assert first_line(ValueError("a\nb")) == "ValueError: a"


def test_a_rank_that_failed_deterministically_stops_the_survivors_requeue(tmp_path):
    restarts = Restarts(tmp_path, limit=3)
    assert restarts.handle("8", "0", 0, ConfigError("model.arch='x'"), 1)[0] == "fail"
    action, reason = restarts.handle("8", "0", 1, _crash(), 1)
    assert action == "fail" and reason == "not restarted: rank 0 failed deterministically (ConfigError: model.arch='x')"
    assert restarts.done() == []


def test_the_same_error_at_the_same_step_twice_is_not_retried(tmp_path):
    restarts = Restarts(tmp_path, limit=5)
    assert restarts.handle("9", "0", 0, IndexError("index 12 is out of bounds"), 6) == ("requeue", 1)
    action, reason = restarts.handle("9", "1", 0, IndexError("index 12 is out of bounds"), 6)
    assert action == "fail" and reason.startswith("not restarted: the same error at the same step 6"), reason
    assert restarts.handle("9", "2", 0, IndexError("index 12 is out of bounds"), 7) == ("requeue", 2)


_BACKENDS_IN_ORDER = """
import sys
from densessl.pipeline import PairSpec, ViewSpec, build_loader
from densessl.pipeline.ffcv import write_beton

root, beton, order = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
specs = [PairSpec(size=(64, 64), num_matches=8, min_matches=8), ViewSpec.multicrop("2x64,4x32", min_cells=16,
                                                                                  num_matches=8)]
for backend in order:
    data = write_beton(root, beton, write_mode="jpg") if backend == "ffcv" else root
    for spec in specs:
        batch = next(iter(build_loader(backend, data, spec, batch_size=4, workers=1, seed=0)))
        print(backend, type(spec).__name__, sorted(batch)[0], flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("order", ["ffcv,dali", "dali,ffcv"])
def test_ffcv_and_dali_compile_in_either_order_from_an_empty_numba_cache(synthetic_root, tmp_path, order):
    """A fresh process with an empty Numba cache once failed to compile DALI's CPU graph after FFCV had run
    (``Cannot modify readonly array`` in ``resize_crop_aa``): both orders, pairs and multi-crop, at the suite's
    view sizes."""
    if not os.environ.get("DENSESSL_REQUIRE_BACKENDS"):
        pytest.importorskip("nvidia.dali")
        pytest.importorskip("ffcv")
    cache = tmp_path / "numba_cache"
    cache.mkdir()
    out = subprocess.run([sys.executable, "-c", _BACKENDS_IN_ORDER, str(synthetic_root / "train"),
                          str(tmp_path / "data.beton"), order], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "NUMBA_CACHE_DIR": str(cache)}, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    first, second = order.split(",")
    assert [line.split()[:2] for line in lines] == [[first, "PairSpec"], [first, "ViewSpec"],
                                                    [second, "PairSpec"], [second, "ViewSpec"]], out.stdout
    assert any(cache.rglob("*.nbi")), "the run did not use the empty cache it was given"
