"""What a user owns survives every writer of ours, and a run folder holds one run (issue: data safety)."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from densessl.model import checkpoint
from densessl.pipeline import owned
from densessl.pipeline.synthetic import SyntheticConfig, generate
from densessl.slurm import submit
from densessl.train.config import parse
from runs import REPO, losses, run_train, tiny_args

TINY = SyntheticConfig(height=96, width=128, train_per_class=2, val_per_class=1, videos=1, frames=2)


def user_folder(tmp_path) -> Path:
    """A folder of the user's: one image, one note."""
    folder = tmp_path / "imagenet"
    (folder / "n01440764").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(folder / "n01440764" / "fish.jpg")
    (folder / "notes.txt").write_text("mine")
    return folder


def untouched(folder: Path) -> bool:
    return ((folder / "n01440764" / "fish.jpg").is_file() and (folder / "notes.txt").read_text() == "mine"
            and not (folder / owned.MARKER).exists())


def one_line_error(proc, path: Path) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: ") and str(path) in lines[0] and "not written by densessl" in lines[0]
    return lines[0]


def module(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_the_embedded_set_writer_refuses_a_folder_it_did_not_write(tmp_path):
    folder = user_folder(tmp_path)
    with pytest.raises(owned.NotOurs, match="not written by densessl"):
        generate(folder, TINY, progress=False)
    assert untouched(folder)
    one_line_error(module("densessl.pipeline.synthetic", "--out", str(folder)), folder)
    assert untouched(folder)


def test_the_embedded_set_writer_replaces_its_own_interrupted_set_only(tmp_path):
    root = generate(tmp_path / "set", TINY, progress=False)
    (root / ".complete").unlink()  # as if interrupted
    (root / "stray.txt").write_text("ours to replace")
    generate(root, TINY, progress=False)
    assert not (root / "stray.txt").exists() and (root / ".complete").is_file()
    assert owned.kind(root) == "synthetic-set"
    other = tmp_path / "empty"
    other.mkdir()
    assert generate(other, TINY, progress=False) == other  # an empty folder may be used


def test_the_demo_and_compare_refuse_a_user_folder_as_their_embedded_set(tmp_path):
    folder = user_folder(tmp_path)
    demo = module("densessl.experiments.demo", "--tiny", "--synthetic-dir", str(folder), "--out",
                  str(tmp_path / "demo"))
    one_line_error(demo, folder)
    compare = module("densessl.experiments.compare", "--tiny", "--synthetic-dir", str(folder), "--out",
                     str(tmp_path / "compare"))
    one_line_error(compare, folder)
    assert untouched(folder)
    renamed = module("densessl.experiments.demo", "--tiny", "--data", str(folder))
    assert renamed.returncode == 2 and "--synthetic-dir" in renamed.stderr and untouched(folder)


def test_the_trainer_refuses_a_user_folder_as_data_synthetic_dir_or_run_dir(tmp_path):
    folder = user_folder(tmp_path)
    proc = run_train(["data.path=synthetic", f"data.synthetic_dir={folder}", f"run.dir={tmp_path / 'run'}",
                      "model.arch=resnet18", "optim.steps=1", "run.progress=false"])
    assert "data.synthetic_dir" in one_line_error(proc, folder)
    proc = run_train(["data.path=synthetic", f"data.synthetic_dir={tmp_path / 'set'}", f"run.dir={folder}",
                      "model.arch=resnet18", "optim.steps=1", "run.progress=false"])
    assert "run.dir" in one_line_error(proc, folder)
    assert untouched(folder) and not (tmp_path / "set").exists()


def test_the_photo_set_refuses_a_user_folder(tmp_path):
    from densessl.benchmarks.photos import write_photo_set
    folder = user_folder(tmp_path)
    with pytest.raises(owned.NotOurs):
        write_photo_set(folder, count=2)
    assert untouched(folder)
    root = write_photo_set(tmp_path / "photos", count=2)
    assert len(list(root.glob("*/*.jpg"))) == 2
    assert write_photo_set(tmp_path / "photos", count=3) == root and len(list(root.glob("*/*.jpg"))) == 3


def test_output_folders_of_evaluation_and_benchmarks_refuse_a_user_folder(tmp_path):
    folder = user_folder(tmp_path)
    ev = module("densessl.evaluation", "export", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(folder))
    one_line_error(ev, folder)
    with pytest.raises(SystemExit, match="not written by densessl"):
        from densessl.benchmarks.gpu_bundle import main
        main(["--out", str(folder)])
    assert untouched(folder)


def test_a_second_run_in_an_old_run_folder_is_refused_and_continued_with_resume_auto(synthetic_root, tmp_path):
    run = tmp_path / "run"
    first = run_train(tiny_args(synthetic_root, run, **{"optim.steps": 4, "run.keep_checkpoints": 10}))
    assert first.returncode == 0, first.stderr[-2000:]
    before = losses(run)
    second = run_train(tiny_args(synthetic_root, run, **{"optim.steps": 2}))
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 1 and len(lines) == 1 and "holds another run" in lines[0], second.stderr[-2000:]
    assert [checkpoint.step_of(p) for p in checkpoint.checkpoints(run / "checkpoints")] == [1, 2, 3, 4]
    assert losses(run) == before  # metrics.csv untouched
    other = run_train(tiny_args(synthetic_root, run, **{"optim.steps": 6, "run.resume": "auto",
                                                        "optim.lr": 0.5}))
    assert other.returncode == 1 and "other settings (optim.lr)" in other.stderr, other.stderr[-2000:]
    more = run_train(tiny_args(synthetic_root, run, **{"optim.steps": 6, "run.resume": "auto"}))
    assert more.returncode == 0 and "resumed from" in more.stdout, more.stderr[-2000:]
    after = losses(run)
    assert sorted(after) == list(range(1, 7)) and all(after[s] == before[s] for s in before)  # appended


def test_resuming_an_earlier_step_needs_overwrite_which_drops_only_the_later_steps(synthetic_root, tmp_path):
    run = tmp_path / "run"
    assert run_train(tiny_args(synthetic_root, run, **{"optim.steps": 4, "run.keep_checkpoints": 10})).returncode == 0
    step2 = run / "checkpoints" / "step_00000002.pt"
    back = run_train(tiny_args(synthetic_root, run, **{"optim.steps": 4, "run.resume": step2}))
    assert back.returncode == 1 and "holds step 4, after the resumed step 2" in back.stderr, back.stderr[-2000:]
    again = run_train(tiny_args(synthetic_root, run, **{"optim.steps": 3, "run.resume": step2,
                                                        "run.overwrite": "true", "run.keep_checkpoints": 10}))
    assert again.returncode == 0, again.stderr[-2000:]
    assert [checkpoint.step_of(p) for p in checkpoint.checkpoints(run / "checkpoints")] == [1, 2, 3]
    with open(run / "metrics.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3]  # no row lost, none repeated
    fresh = run_train(tiny_args(synthetic_root, run, **{"optim.steps": 1, "run.overwrite": "true"}))
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert [checkpoint.step_of(p) for p in checkpoint.checkpoints(run / "checkpoints")] == [1]


def test_pruning_never_deletes_a_later_step_for_an_earlier_one(tmp_path):
    checkpoint.save({"step": 1000}, tmp_path, 1000)
    for step in (100, 200, 300):
        checkpoint.save({"step": step}, tmp_path, step, keep=2)
    assert [checkpoint.step_of(p) for p in checkpoint.checkpoints(tmp_path)] == [200, 300, 1000]


def test_a_machine_error_while_reading_is_not_taken_for_a_corrupt_file(tmp_path):
    checkpoint.save({"step": 1}, tmp_path, 1)
    (tmp_path / "step_00000002.pt").mkdir()  # reading it fails with an OSError, as an I/O error would
    with pytest.raises(IsADirectoryError):
        checkpoint.load_latest(tmp_path)


def test_same_second_slurm_submissions_get_their_own_run_folders(tmp_path, monkeypatch):
    class Frozen(submit.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 12, 3, 12, 0, 0)
    monkeypatch.setattr(submit, "datetime", Frozen)
    folders = set()
    for _ in range(2):
        args, train_args = submit.parse_args(["--local", "--job-dir", str(tmp_path), "--", "optim.steps=1"])
        folders.add(next(a for a in submit.own_run_dir(args, train_args) if a.startswith("run.dir=")))
    assert len(folders) == 2


def test_an_explicit_resume_path_is_honoured_on_the_first_start_and_requeues_continue_the_run(tmp_path):
    path = tmp_path / "elsewhere.pt"
    path.write_bytes(b"")
    args = [f"run.dir={tmp_path / 'run'}", f"run.resume={path}", "run.overwrite=true"]
    assert submit.start_args(args, "0") == [f"run.resume={path}"]
    assert submit.start_args(args, "1") == [f"run.resume={path}", "run.overwrite=false"]  # no checkpoint yet
    checkpoint.save({"step": 5}, tmp_path / "run" / "checkpoints", 5)
    assert submit.start_args(args, "2") == ["run.resume=auto", "run.overwrite=false"]
    assert submit.start_args([f"run.dir={tmp_path}"], "0") == ["run.resume=auto"]
    assert parse(args + submit.start_args(args, "2")).run.resume == "auto"


def test_a_resume_path_starts_a_new_folder_from_it(synthetic_root, tmp_path):
    first = run_train(tiny_args(synthetic_root, tmp_path / "a", **{"optim.steps": 2}))
    assert first.returncode == 0, first.stderr[-2000:]
    ckpt = tmp_path / "a" / "checkpoints" / "step_00000002.pt"
    second = run_train(tiny_args(synthetic_root, tmp_path / "b", **{"optim.steps": 3, "run.resume": ckpt}))
    assert second.returncode == 0 and f"resumed from {ckpt} at step 2" in second.stdout, second.stderr[-2000:]


def test_cuda_on_a_host_without_it_is_one_line(synthetic_root, tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    proc = run_train(tiny_args(synthetic_root, tmp_path / "run", **{"run.device": "cuda"}))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "run.device=cuda" in lines[0], proc.stderr


def test_the_beton_writer_refuses_a_file_it_did_not_write(synthetic_root, tmp_path):
    from densessl.pipeline.ffcv import write_beton
    precious = tmp_path / "thesis.beton"
    precious.write_bytes(b"my thesis" * 1000)
    with pytest.raises(owned.NotOurs, match="not written by densessl"):
        write_beton(synthetic_root / "train", precious, workers=1)
    one_line_error(module("densessl.pipeline.ffcv", str(synthetic_root / "train"), str(precious)), precious)
    assert precious.read_bytes() == b"my thesis" * 1000
    ours = write_beton(synthetic_root / "train", tmp_path / "ours.beton", workers=1)
    assert write_beton(synthetic_root / "train", ours, workers=1) == ours  # its own file is written again


def test_a_user_folder_sharing_our_file_names_is_still_refused_and_an_old_set_of_ours_is_kept(tmp_path):
    folder = user_folder(tmp_path)
    for name in ("meta.json", "config.yaml", "results.json", ".complete", "metrics.csv"):
        (folder / name).write_text("{}\n")
    (folder / "checkpoints").mkdir()
    with pytest.raises(owned.NotOurs):
        generate(folder, TINY, progress=False)
    proc = run_train(["data.path=synthetic", f"data.synthetic_dir={tmp_path / 'set'}", f"run.dir={folder}",
                      "model.arch=resnet18", "optim.steps=1", "run.progress=false"])
    one_line_error(proc, folder)
    assert untouched(folder) and (folder / "config.yaml").read_text() == "{}\n"
    old = generate(tmp_path / "old", TINY, progress=False)
    (old / owned.MARKER).unlink()  # as written before markers existed
    assert generate(old, TINY, progress=False) == old and owned.kind(old) == "synthetic-set"
