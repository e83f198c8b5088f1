"""A checkpoint file can never run code: every entry point that reads one is fed a file whose pickle would run a
shell command, and must refuse it in one line, non-zero, without running it. Checkpoints written by the current
code still load everywhere."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from densessl.evaluation.__main__ import main as evaluation_main
from densessl.model import checkpoint
from densessl.model.builder import MoCo, ModelConfig, model_config
from densessl.model.methods import method_config
from densessl.train.config import TrainConfig, to_dict
from densessl.train.trainer import main as train_main


class RunsAShellCommand:
    """Unpickling this calls ``os.system``: what a hostile checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def hostile(path: Path, marker: Path, **state) -> Path:
    """A file that looks like a checkpoint (``state``) and also holds the payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**state, "notes": RunsAShellCommand(marker)}, path)
    return path


def our_state(method: str = "vader") -> dict:
    cfg = TrainConfig(model=ModelConfig(arch="resnet18"), method=method_config(method, queue_size=256))
    model = MoCo(cfg.model, cfg.method)
    return {"model": model.state_dict(), "model_config": model_config(model.cfg, model.method_cfg),
            "config": to_dict(cfg)}


def train_args(synthetic_root, run_dir, **extra) -> list[str]:
    args = {"data.path": synthetic_root / "train", "model.arch": "resnet18", "views.size": 64,
            "optim.batch_size": 4, "data.workers": 0, "method.queue_size": 256, "views.num_matches": 8,
            "views.min_matches": 8, "run.dir": run_dir, "run.progress": "false", "optim.steps": 2, "optim.lr": 0.1,
            "optim.decoder_lr": 0.1, **extra}
    return [f"{k}={v}" for k, v in args.items()]


def refused_in_one_line(capsys, code, marker: Path, file: Path) -> None:
    err = capsys.readouterr().err.strip()
    assert code != 0, "the command succeeded"
    assert not marker.exists(), "the checkpoint's code ran"
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert str(file) in err and "refused posix.system" in err, err


def exit_code(fn, argv) -> int:
    """``fn(argv)``'s exit status as the interpreter would end it: a SystemExit message goes to stderr, status 1."""
    try:
        return fn(argv) or 0
    except SystemExit as stop:
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
            return 1
        return stop.code or 0


@pytest.mark.parametrize("entry", ["checkpoint_features", "mocov2_features", "torchvision_features", "export",
                                   "all"])
def test_evaluation_entry_points_refuse_code(entry, tmp_path, capsys, synthetic_root):
    marker = tmp_path / "ran"
    if entry in ("mocov2_features", "torchvision_features"):
        file = hostile(tmp_path / "moco.pth.tar", marker, state_dict=torchvision.models.resnet18().state_dict())
    else:
        file = hostile(tmp_path / "run" / "checkpoints" / "step_00000002.pt", marker, **our_state())
    argv = {"checkpoint_features": ["segmentation", "--features", f"checkpoint:{tmp_path / 'run'}"],
            "mocov2_features": ["segmentation", "--arch", "resnet18", "--features", f"mocov2:{file}"],
            "torchvision_features": ["segmentation", "--arch", "resnet18", "--features", f"torchvision:{file}"],
            "export": ["export", "--checkpoint", str(tmp_path / "run")],
            "all": ["all", "--checkpoint", str(tmp_path / "run")]}[entry]
    code = exit_code(evaluation_main, argv + ["--root", str(synthetic_root), "--out", str(tmp_path / "out")])
    refused_in_one_line(capsys, code, marker, file)


@pytest.mark.parametrize("entry", ["resume", "resume_auto", "init_encoder"])
def test_training_entry_points_refuse_code(entry, tmp_path, capsys, synthetic_root):
    marker, run = tmp_path / "ran", tmp_path / "run"
    if entry == "init_encoder":
        file = hostile(tmp_path / "moco.pth.tar", marker, state_dict=torchvision.models.resnet18().state_dict())
        extra = {"model.init_encoder": file}
    else:
        file = hostile(run / "checkpoints" / "step_00000001.pt", marker, **our_state(), global_step=1)
        extra = {"run.resume": "auto" if entry == "resume_auto" else file}
    code = exit_code(train_main, train_args(synthetic_root, run, **extra))
    refused_in_one_line(capsys, code, marker, file)


def test_a_refused_newest_checkpoint_is_not_skipped_but_a_truncated_one_is(tmp_path):
    good = checkpoint.save({"model": {"w": torch.ones(2)}}, tmp_path, 1)
    truncated = tmp_path / "step_00000002.pt"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.warns(UserWarning, match="not a readable checkpoint"):
        state, path = checkpoint.load_latest(tmp_path)
    assert path == good
    hostile(tmp_path / "step_00000003.pt", tmp_path / "ran", model={})
    with pytest.raises(checkpoint.RefusedCheckpoint, match="step_00000003.pt: refused posix.system"):
        checkpoint.load_latest(tmp_path)
    assert not (tmp_path / "ran").exists()


def test_a_file_that_is_no_checkpoint_is_one_line(tmp_path):
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match=r"notes.pt: not a readable checkpoint") as err:
        checkpoint.read(tmp_path / "notes.pt")
    assert "\n" not in str(err.value)


def test_checkpoints_written_by_the_trainer_load_at_every_entry_point(tmp_path, capsys, synthetic_root):
    """A real checkpoint (numpy's RNG state, optimizer state, loader states) loads for resume (explicit and
    auto), evaluation's checkpoint: and mocov2: features, export and init_encoder=, all weights only."""
    run = tmp_path / "run"
    assert exit_code(train_main, train_args(synthetic_root, run, **{"run.checkpoint_every": 1})) == 0
    first = tmp_path / "step_00000001.pt"  # kept aside: later runs keep only their newest two
    first.write_bytes(checkpoint.checkpoints(run / "checkpoints")[0].read_bytes())
    # an earlier step than the folder's newest: overwrite drops the later ones (run_folder)
    assert exit_code(train_main, train_args(synthetic_root, run, **{"optim.steps": 3, "run.resume": first,
                                                                    "run.overwrite": "true"})) == 0
    assert "resumed from" in capsys.readouterr().out
    assert exit_code(train_main, train_args(synthetic_root, run, **{"optim.steps": 4, "run.resume": "auto"})) == 0
    assert "at step 3" in capsys.readouterr().out
    assert exit_code(train_main, train_args(synthetic_root, tmp_path / "init", **{"model.init_encoder": first})) == 0
    assert evaluation_main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "export")]) == 0
    names = {f"checkpoint:{run}": "run/step_00000004 [dense]", f"mocov2:{first}": "mocov2 step_00000001.pt [c5]"}
    from densessl.evaluation.features import feature_extractors
    found = feature_extractors(list(names), "resnet18", kinds=("dense", "c5"))
    assert set(names.values()) <= set(found), found


def test_the_command_line_exits_non_zero_with_one_line(tmp_path):
    """The same refusal through a real process: its exit status and everything it printed."""
    file = hostile(tmp_path / "run" / "checkpoints" / "step_00000002.pt", tmp_path / "ran", **our_state())
    done = subprocess.run([sys.executable, "-m", "densessl.evaluation", "export", "--checkpoint", str(tmp_path / "run"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode != 0 and not (tmp_path / "ran").exists()
    assert done.stderr.strip() == f"error: {file}: refused posix.system: checkpoints are loaded weights only " \
                                  "(tensors, plain Python values, numpy arrays), so that a file cannot run code"


def test_one_place_in_the_project_unpickles_files():
    """Every torch.load of the shipped code is checkpoint.load_file's, and nothing turns weights-only off."""
    repo = Path(__file__).resolve().parents[1]
    folders = ("pipeline", "model", "train", "evaluation", "slurm", "benchmarks", "experiments", "examples")
    shipped = [p for folder in folders for p in (repo / folder).rglob("*.py")]
    loads = [f"{p.relative_to(repo)}" for p in shipped if "torch.load(" in p.read_text()]
    assert loads == ["model/checkpoint.py"], loads
    ours = shipped + list((repo / "tests").rglob("*.py"))
    assert not [p for p in ours if "weights_only=" + "False" in p.read_text()]
