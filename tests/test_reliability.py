"""Bad images, faults and bad configuration never lose a run: every backend over a corpus of awkward files,
a loss that blows up, a checkpoint write that runs out of space."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from corpus import BAD, write_corpus
from densessl.model import checkpoint
from densessl.pipeline import PairSpec, build_loader, check_batch, scan_image_folder
from densessl.pipeline.folder import BadImage, decode_rgb
from densessl.pipeline.screening import screen_file
from densessl.train.config import parse

SPEC = PairSpec(size=(64, 64), num_matches=8, min_matches=8)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def reported(log: Path) -> set[str]:
    return {Path(line.split("\t")[0]).name for line in log.read_text().splitlines()} if log.exists() else set()


def check_batches(batches, n_files):
    assert batches
    for b in batches:
        check_batch(b, SPEC)
        assert ((b["index"] >= 0) & (b["index"] < n_files)).all()
        assert torch.isfinite(b["match_xy2"]).all()


def test_decoder_handles_every_awkward_case(corpus):
    a = corpus / "a"
    for name in BAD:
        with pytest.raises(BadImage):
            decode_rgb((a / name).read_bytes())
        assert screen_file(str(a / name)) is not None, name
    for name in ("cmyk.jpg", "gray.jpg", "alpha.png", "deep16.png", "rotated.jpg", "tiny.jpg", "wide.jpg"):
        assert screen_file(str(a / name)) is None, name
        image = decode_rgb((a / name).read_bytes())
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, name
    upright = np.asarray(ImageOps.exif_transpose(Image.open(a / "rotated.jpg")).convert("RGB"))
    assert decode_rgb((a / "rotated.jpg").read_bytes()).shape == upright.shape == (160, 96, 3)
    assert np.abs(decode_rgb((a / "rotated.jpg").read_bytes()).astype(int) - upright).mean() < 2
    deep = decode_rgb((a / "deep16.png").read_bytes())
    assert 100 < deep.mean() < 160  # scaled from 16 bits, not clipped to white


def test_reference_loader_skips_and_reports_bad_files(corpus, tmp_path):
    log = tmp_path / "skipped.txt"
    files = scan_image_folder(corpus).files
    batches = list(build_loader("torch", corpus, SPEC, batch_size=4, workers=2, skip_log=str(log),
                                drop_last=False))  # workers also warn on stderr
    check_batches(batches, len(files))
    assert sum(len(b["index"]) for b in batches) == len(files)  # replaced, not dropped
    assert reported(log) == set(BAD)


def test_dali_screens_out_bad_files(corpus, tmp_path):
    pytest.importorskip("nvidia.dali") if not os.environ.get("DENSESSL_REQUIRE_BACKENDS") else None
    log = tmp_path / "skipped.txt"
    loader = build_loader("dali", corpus, SPEC, batch_size=4, workers=2, skip_log=str(log), drop_last=False)
    batches = list(loader)
    check_batches(batches, len(scan_image_folder(corpus)))
    assert sum(len(b["index"]) for b in batches) == len(scan_image_folder(corpus)) - len(BAD)
    assert reported(log) == set(BAD)


def test_ffcv_writer_replaces_and_reports_bad_files(corpus, tmp_path):
    pytest.importorskip("ffcv") if not os.environ.get("DENSESSL_REQUIRE_BACKENDS") else None
    from densessl.pipeline.ffcv import write_beton
    beton = write_beton(corpus, tmp_path / "corpus.beton", workers=2)
    assert reported(Path(f"{beton}.skipped.txt")) == set(BAD)
    batches = list(build_loader("ffcv", beton, SPEC, batch_size=4, workers=2, drop_last=False))
    check_batches(batches, len(scan_image_folder(corpus)))
    with pytest.raises(RuntimeError, match="max_bad_images=2"):
        write_beton(corpus, tmp_path / "strict.beton", workers=2, max_bad_images=2)


def train_args(data, run_dir, **extra):
    """``section.key=value`` arguments of a tiny CPU run; ``extra`` takes dotted keys: ``**{"optim.steps": 3}``."""
    args = {"data.path": data, "model.arch": "resnet18", "views.size": 64, "optim.batch_size": 4,
            "data.workers": 2, "method.queue_size": 256, "views.num_matches": 8, "views.min_matches": 8,
            "run.dir": run_dir, "run.progress": "false", "run.checkpoint_every": 2, "optim.steps": 4, **extra}
    return [f"{k}={v}" for k, v in args.items()]


def test_training_lists_skipped_files_and_enforces_the_cap(corpus, tmp_path):
    from densessl.train.trainer import run
    run(parse(train_args(corpus, tmp_path / "ok", **{"optim.steps": 8})))
    assert set() < reported(tmp_path / "ok" / "skipped.txt") <= set(BAD)  # those drawn in 8 steps
    with pytest.raises(RuntimeError, match="max_bad_images=1"):
        run(parse(train_args(corpus, tmp_path / "strict", **{"data.max_bad_images": 1, "optim.steps": 8})))


def test_feature_pictures_pass_over_unreadable_files(corpus):
    """The training images shown in TensorBoard come from the data set, bad files and all: never a crash."""
    from densessl.pipeline import preview_images
    n = len(scan_image_folder(corpus))
    images = preview_images(corpus, n, 32)  # every file, the bad ones replaced by their readable neighbours
    assert images.shape == (n, 3, 32, 32) and images.dtype == torch.uint8


def test_nonfinite_loss_stops_with_the_batch_saved(corpus, tmp_path):
    from densessl.train.trainer import run
    with pytest.raises(FloatingPointError, match="batch indices saved"):
        run(parse(train_args(corpus, tmp_path / "nan", **{"optim.lr": 1e30, "optim.decoder_lr": 1e30,
                                                          "optim.steps": 20})))
    report = json.loads(next((tmp_path / "nan").glob("nonfinite_step*_rank0.json")).read_text())
    assert len(report["indices"]) == 4 and report["step"] > 1


def test_nonfinite_steps_can_be_skipped_without_poisoning_the_queue(corpus, tmp_path):
    from densessl.train.trainer import run
    run_dir = tmp_path / "skip"
    with pytest.raises(FloatingPointError, match="2 earlier step"):
        run(parse(train_args(corpus, run_dir, **{"optim.lr": 1e30, "optim.decoder_lr": 1e30, "optim.steps": 20,
                                                 "run.checkpoint_every": 1, "run.keep_checkpoints": 20,
                                                 "run.on_nonfinite": "skip", "run.max_nonfinite_skips": 2})))
    saved = {int(p.stem.split("_")[1]): checkpoint.load_file(p)["model"]
             for p in (run_dir / "checkpoints").glob("step_*.pt")}
    first_bad = min(json.loads(p.read_text())["step"] for p in run_dir.glob("nonfinite_step*_rank0.json"))
    before, after = saved[first_bad - 1], saved[max(saved)]
    assert max(saved) > first_bad - 1  # skipped steps were checkpointed too
    assert torch.isfinite(after["queue_dense"]).all()
    for key in before:
        if key.startswith("encoder_k.") or key.startswith("queue"):
            assert torch.equal(before[key], after[key]), key  # skipped steps changed nothing


def logged_steps(run_dir):
    return [int(r.split(",")[0]) for r in (Path(run_dir) / "metrics.csv").read_text().splitlines()[1:]]


def test_killed_mid_checkpoint_write_resumes_without_lost_steps(corpus, tmp_path):
    """SIGKILL while a checkpoint's temporary file is being written, then resume=auto."""
    import signal
    import time
    run_dir = tmp_path / "kill"
    args = train_args(corpus, run_dir, **{"optim.steps": 12, "run.checkpoint_every": 3, "data.workers": 0,
                                          "run.resume": "auto"})
    proc = subprocess.Popen([sys.executable, "-m", "densessl.train", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((run_dir / "checkpoints").glob(".step_00000006.pt.tmp-*")):  # the second checkpoint's write
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "checkpoints" / "step_00000006.pt").exists()  # killed before the rename
    done = subprocess.run([sys.executable, "-m", "densessl.train", *args], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "at step 3 " in done.stdout  # the last complete checkpoint
    assert logged_steps(run_dir) == list(range(1, 13))
    assert not list((run_dir / "checkpoints").glob(".*tmp*"))  # the partial file was cleaned up


def test_truncated_latest_checkpoint_resumes_from_the_previous(corpus, tmp_path):
    from densessl.train.trainer import run
    run_dir = tmp_path / "trunc"
    run(parse(train_args(corpus, run_dir, **{"optim.steps": 6, "run.checkpoint_every": 2, "run.keep_checkpoints": 3,
                                             "data.workers": 0})))
    latest = run_dir / "checkpoints" / "step_00000006.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 3])
    with pytest.warns(UserWarning, match="not a readable checkpoint"):
        run(parse(train_args(corpus, run_dir, **{"optim.steps": 8, "run.checkpoint_every": 2,
                                                 "run.keep_checkpoints": 3, "data.workers": 0, "run.resume": "auto"})))
    assert logged_steps(run_dir) == list(range(1, 9))


def test_disk_full_during_checkpoint_keeps_the_previous_one(tmp_path):
    """A real write failure: the file-size limit (RLIMIT_FSIZE) makes the write syscall fail with EFBIG."""
    checkpoint.save({"step": 1, "w": torch.zeros(10)}, tmp_path, 1)
    code = f"""
import resource, signal, torch
from densessl.model import checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    checkpoint.save({{"step": 2, "w": torch.zeros(1_000_000)}}, {str(tmp_path)!r}, 2)
except Exception as err:  # torch wraps the EFBIG OSError
    print("write failed:", type(err).__name__)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "write failed" in out.stdout, out.stderr
    state, path = checkpoint.load_latest(tmp_path)
    assert state["step"] == 1 and path.name == "step_00000001.pt"
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001.pt"]  # no partial file left behind


def test_stuck_rank_is_named_when_a_collective_times_out(corpus, tmp_path):
    """Rank 1 is frozen (SIGSTOP) mid-run: rank 0's next collective times out and names rank 1."""
    import signal
    import socket
    import time
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = train_args(corpus, tmp_path / "ddp", **{"optim.batch_size": 8, "data.workers": 0, "optim.steps": 200,
                                                   "run.checkpoint_every": 1000, "run.collective_timeout_s": 10})
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
               "RANK": str(rank), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "densessl.train", *args], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    beat = tmp_path / "ddp" / "heartbeat" / "rank1"
    deadline = time.time() + 300
    while not (beat.exists() and int(beat.read_text().split()[0] or 0) >= 2):
        assert time.time() < deadline and procs[0].poll() is None, "training did not start"
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGSTOP)
    try:
        _, err = procs[0].communicate(timeout=120)
    finally:
        procs[1].kill()
    assert procs[0].returncode != 0
    assert re.search(r"rank 1 silent for \d+ s", err), err[-2000:]


@pytest.mark.parametrize("override,message", [
    ({"data": "EMPTY"}, "no class sub-folders"),
    ({"data.max_bad_images": -1}, "data.max_bad_images=-1"),
    ({"data.backend": "ffcv", "data": "/data/x.tar"}, "data.path='/data/x.tar': no such folder"),
])
def test_configuration_errors_are_one_line(tmp_path, override, message):
    from densessl.train.trainer import run
    (tmp_path / "empty").mkdir()
    override = {k: (str(tmp_path / "empty") if v == "EMPTY" else v) for k, v in override.items()}
    data = override.pop("data", tmp_path / "empty")
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        run(parse(train_args(data, tmp_path / "run", **override)))
    assert "\n" not in str(err.value)
