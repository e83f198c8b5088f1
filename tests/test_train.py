import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from densessl.model import checkpoint
from densessl.pipeline import PairSpec
from densessl.train.config import ConfigError, TrainConfig, parse, to_yaml, with_overrides

from runs import REPO, losses, run_train, tiny_args


def test_a_device_setting_resolves_where_torch_can_run_or_says_what_to_use():
    from densessl.train.distributed import resolve_device
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device='gpu': choose auto, cuda or cpu"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device here: use device=auto or device=cpu"):
            resolve_device("cuda")


@pytest.mark.parametrize("args,message", [
    (["method.name=simclr"], "method.name='simclr': choose one of vader, densecl, mocov2"),
    (["optim.batch_size=6"], "optim.batch_size=6 is not divisible by the world size 4"),
    (["method.queue_size=1000"], "method.queue_size=1000 is not a multiple of the 8192 keys"),
    (["views.num_matches=64"], "views.num_matches=64 > min_matches=32: .* raise min_matches"),
    (["views.size=100"], "views.size=.100, 100.: sizes must be multiples of 32"),
    (["data.path=/nonexistent"], "data.path='/nonexistent': no such folder"),
    (["run.resume=/nonexistent.pt"], "run.resume='/nonexistent.pt': no such checkpoint"),
    (["data.path=/data/train.beton"], "data.path='/data/train.beton' is an FFCV .beton: set backend=ffcv"),
    (["data.backend=ffcv", "data.order=quasi_random"], "use order=random"),
    (["data.backend=torch", "data.order=quasi_random"], "data.order='quasi_random' is not available with "
                                                          "backend=torch"),
    (["run.checkpoint_every=0"], "run.checkpoint_every=0 must be >= 1"),
    (["run.keep_checkpoints=0"], "run.keep_checkpoints=0 must be >= 1"),
    (["views.scale=[0.5, 0.2]"], "views.scale=.0.5, 0.2. must satisfy"),
    (["views.stride=8"], "views.stride=8: method.name=vader embeds pixels at stride 4"),
    (["run.device=tpu"], "run.device='tpu'"),
    # what a new user tried (issue 27): each is one line naming the key, not a traceback or a silent run
    (["optim.batch_size=0"], "optim.batch_size=0 must be >= 1"),
    (["optim.steps=-5"], "optim.steps=-5 must be >= 0"),
    (["optim.lr=abc"], "optim.lr='abc': expected a number"),
    (["data.workers=-1"], r"^data.workers=-1 must be >= 0$"),
    (["optim.lrr=0.1"], "optim.lrr: no such key .did you mean optim.lr.."),
    (["run.workers=2"], "run.workers: no such key .it is data.workers."),
    (["nonsense=1"], "nonsense: no such section"),
    (["method.name=mocov2", "method.symmetric=true"], "method.symmetric: no such key"),
    (["method.name=densecl", "method.dense_weight=1.5"], "method.dense_weight=1.5 must be in .0, 1."),
    (["run.progress=maybe"], "run.progress='maybe': expected true or false"),
    # multi-crop views: VADeR's, with a queue that fits every matched pair's keys
    (["views.crops=2x64,2x32", "method.name=densecl"], "views: method.name=densecl learns from one pair of views "
                                                       r"\(its dense term .*\), not 4 views"),
    (["views.crops=2x64,2x32", "method.symmetric=true"], "views: method.name=vader learns from one pair of views "
                                                         r"\(method.symmetric=true"),
    (["views.crops=2x98"], "views.crops='2x98': group global: size=.98, 98. is not a multiple"),
    (["views.crops=2x64,2x32", "method.queue_size=1000"], "not a multiple of the 40960 keys"),
    # the flat keys of densessl 0.1 name their new keys
    (["view_size=224"], "view_size: this flat key is now views.size"),
    (["objective=densecl"], "objective: this flat key is now method.name"),
    (["moco_momentum=0"], "moco_momentum: this flat key is now method.momentum"),
    (["densecl_lambda=0.3"], "densecl_lambda: this flat key is now method.dense_weight"),
    (["run_dir=x"], "run_dir: this flat key is now run.dir"),
    (["ffcv_order=random"], "ffcv_order: this flat key is now data.order"),
])
def test_config_errors_are_one_line_naming_the_key(args, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse(["optim.batch_size=256", *args]).validate(world_size=4)
    assert "\n" not in str(err.value)


def test_every_value_has_its_range_checked():
    """No numeric setting takes a value outside its range silently: each section refuses a negative one."""
    from dataclasses import fields as dataclass_fields
    cfg = TrainConfig()
    for section in ("data", "views", "model", "method", "optim", "run"):
        for f in dataclass_fields(getattr(cfg, section)):
            value = getattr(getattr(cfg, section), f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            with pytest.raises(ConfigError, match=f"{section}.*{f.name}"):
                parse([f"{section}.{f.name}=-1"]).validate()


def test_a_configuration_mistake_exits_with_one_line_and_no_traceback(tmp_path):
    done = run_train(["optim.batch_size=0"])
    assert done.returncode != 0 and done.stderr.strip() == "error: optim.batch_size=0 must be >= 1", done.stderr


def test_parse_yaml_then_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("method:\n  name: densecl\noptim:\n  batch_size: 64\n")
    cfg = parse(["--config", str(tmp_path / "c.yaml"), "optim.batch_size=32", "method.warmup_steps=3"])
    assert (cfg.method.name, cfg.optim.batch_size, cfg.method.warmup_steps) == ("densecl", 32, 3)
    assert cfg.method.temperature == 0.2  # the method's own default
    assert parse(["optim.lr=1e-3"]).optim.lr == 1e-3  # YAML 1.1 reads this as a string
    (tmp_path / "flat.yaml").write_text("objective: densecl\n")
    with pytest.raises(ConfigError, match="objective: this flat key is now method.name"):
        parse(["--config", str(tmp_path / "flat.yaml")])


def test_the_written_config_reads_back(tmp_path):
    cfg = parse(["method.name=densecl", "views.size=[64, 96]", "optim.steps=3", "model.arch=resnet18"])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    assert parse(["--config", str(tmp_path / "config.yaml")]) == cfg


def test_view_settings_reach_the_loader_as_the_spec_itself():
    cfg = parse(["views.scale=[0.5,0.9]", "views.ratio=[1.0,1.0]", "views.flip_p=0", "method.name=mocov2",
                 "views.stride=8", "views.size=64", "views.num_matches=4", "views.min_matches=4"])
    spec = cfg.views
    assert isinstance(spec, PairSpec)
    assert (spec.scale, spec.ratio, spec.flip_p, spec.stride, spec.grid) == ((0.5, 0.9), (1.0, 1.0), 0.0, 8, (8, 8))


def test_keeping_no_checkpoint_is_refused(tmp_path):
    with pytest.raises(ValueError, match="keep=0"):
        checkpoint.save({"step": 1}, tmp_path, 1, keep=0)


def test_checkpoints_are_pruned_and_corrupt_ones_skipped(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save({"step": step}, tmp_path, step, keep=2)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step_00000002.pt", "step_00000003.pt"]
    latest = checkpoint.checkpoints(tmp_path)[-1]
    latest.write_bytes(latest.read_bytes()[:20])  # truncated, as by a crash mid-copy
    with pytest.warns(UserWarning, match="not a readable checkpoint"):
        state, path = checkpoint.load_latest(tmp_path)
    assert state == {"step": 2} and path.name == "step_00000002.pt"
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_kill_and_resume_reproduces_the_uninterrupted_run(synthetic_root, tmp_path, backend):
    """SIGKILL after a checkpoint, resume=auto: every step's loss as in the unbroken run (DALI: through its
    pipeline checkpoint; the reference loader: through the seeded sampler)."""
    if backend == "dali" and not os.environ.get("DENSESSL_REQUIRE_BACKENDS"):
        pytest.importorskip("nvidia.dali")
    steps = 14  # 6 batches an epoch: killed in the second epoch, where DALI's reader has reshuffled
    ref = run_train(tiny_args(synthetic_root, tmp_path / "ref", **{"optim.steps": steps, "data.backend": backend}))
    assert ref.returncode == 0, ref.stderr[-2000:]
    args = tiny_args(synthetic_root, tmp_path / "cut", **{"optim.steps": steps, "run.resume": "auto",
                                                          "data.backend": backend})
    proc = subprocess.Popen([sys.executable, "-m", "densessl.train", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (tmp_path / "cut" / "checkpoints" / "step_00000008.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_train(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    start = int(resumed.stdout.split("at step ")[1].split()[0])
    assert 8 <= start < steps, resumed.stdout
    want, got = losses(tmp_path / "ref"), losses(tmp_path / "cut")
    assert sorted(got) == list(range(1, steps + 1)), "a step was lost or repeated"
    for step in range(1, steps + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-4), f"step {step}"


def _ddp_worker(rank, world, port, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from densessl.train.trainer import run
    model = run(parse(args)).model
    torch.save({"queue": model.queue_dense, "ptr": model.queue_dense_ptr,
                "params": torch.cat([p.detach().flatten() for p in model.encoder_q.parameters()])},
               f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_process_gloo_ddp_keeps_queues_identical(synthetic_root, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = tiny_args(synthetic_root, tmp_path / "ddp", **{"optim.steps": 3, "data.workers": 0, "optim.batch_size": 8,
                                                          "run.checkpoint_every": 100})
    mp.start_processes(_ddp_worker, args=(2, port, args, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert int(r0["ptr"]) == int(r1["ptr"]) == 3 * 8 * 8 % 256
    torch.testing.assert_close(r0["queue"], r1["queue"], rtol=0, atol=0)
    torch.testing.assert_close(r0["params"], r1["params"], rtol=0, atol=0)
    assert (tmp_path / "ddp" / "checkpoints" / "step_00000003.pt").exists()


def test_a_stop_request_is_honoured_once(synthetic_root, tmp_path):
    """A stop requested before or during a run stops it after one step, checkpointed; the next run in the same
    process (a notebook, submitit's local executor) trains all its steps."""
    from densessl.train.distributed import request_stop
    from densessl.train.trainer import run
    request_stop()
    first = run(parse(tiny_args(synthetic_root, tmp_path / "first", **{"optim.steps": 3, "data.workers": 0})))
    assert (first.stopped, first.step) == (True, 1)
    assert (tmp_path / "first" / "checkpoints" / "step_00000001.pt").exists()
    second = run(parse(tiny_args(synthetic_root, tmp_path / "second", **{"optim.steps": 3, "data.workers": 0})))
    assert (second.stopped, second.step) == (False, 3)


def test_deferred_synchronisation_trains_and_logs_the_same_run(synthetic_root, tmp_path):
    """sync_every=3 reads the losses three steps at a time: step for step the losses of a run that reads
    each step's (the device queue is never drained in between, the arithmetic is the same)."""
    from densessl.train.trainer import run
    for name, every in (("each", 1), ("deferred", 3)):
        run(parse(tiny_args(synthetic_root, tmp_path / name, **{"optim.steps": 7, "run.checkpoint_every": 100,
                                                                "run.sync_every": every})))
    assert len(losses(tmp_path / "each")) == 7
    assert losses(tmp_path / "deferred") == losses(tmp_path / "each")


def test_a_nonfinite_loss_between_synchronisations_stops_before_a_checkpoint(synthetic_root, tmp_path):
    """A loss that blows up in an unsynchronised step is named at the next synchronised one, and the
    poisoned weights are never checkpointed."""
    from densessl.train.trainer import run
    run_dir = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match=r"not finite at step (\d+) \(found at step (\d+)") as err:
        run(parse(tiny_args(synthetic_root, run_dir, **{"optim.steps": 20, "optim.lr": 1e30,
                                                        "optim.decoder_lr": 1e30, "run.sync_every": 10,
                                                        "run.checkpoint_every": 10})))
    bad, found = map(int, re.search(r"step (\d+) \(found at step (\d+)", str(err.value)).groups())
    assert bad <= found and found % 10 == 0
    assert all(int(p.stem.split("_")[1]) < bad for p in (run_dir / "checkpoints").glob("step_*.pt"))


def test_compiled_model_trains_like_eager(synthetic_root, tmp_path):
    """compile=true (torch.compile of the model) gives the eager run's losses within float tolerance."""
    from densessl.train.trainer import run
    for name, compiled in (("eager", "false"), ("compiled", "true")):
        run(parse(tiny_args(synthetic_root, tmp_path / name, **{"optim.steps": 3, "run.checkpoint_every": 100,
                                                                "run.compile": compiled})))
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert compiled.keys() == eager.keys() and compiled == pytest.approx(eager, rel=1e-3)


def test_checkpoints_rebuild_the_model_they_hold(synthetic_root, tmp_path):
    """Every checkpoint carries its model's configuration: evaluation rebuilds the same network from the file."""
    from densessl.train.trainer import run
    trained = run(parse(tiny_args(synthetic_root, tmp_path / "run", **{"optim.steps": 2, "data.workers": 0,
                                                                       "method.name": "densecl",
                                                                       "method.queue_size": 256,
                                                                       "method.temperature": 0.3}))).model
    rebuilt = checkpoint.load_model(tmp_path / "run")
    assert rebuilt.cfg == trained.cfg and rebuilt.method_cfg == trained.method_cfg
    assert rebuilt.method_cfg.temperature == 0.3 and rebuilt.method_cfg.name == "densecl"
    for key, value in trained.state_dict().items():
        assert torch.equal(value.cpu(), rebuilt.state_dict()[key]), key
    assert checkpoint.run_and_step(checkpoint.find(tmp_path / "run")) == "run/step_00000002"


def test_trains_from_a_moco_v2_checkpoint(synthetic_root, tmp_path):
    """init_encoder= takes a checkpoint as facebookresearch/moco's main_moco.py saves it (both encoders, queue)."""
    import torchvision

    from released import released_checkpoints
    from densessl.train.trainer import run
    source = torchvision.models.resnet18(weights=None)
    released_checkpoints(source, torchvision.models.resnet18(weights=None), tmp_path)
    args = tiny_args(synthetic_root, tmp_path / "run", **{"optim.steps": 1, "data.workers": 0, "optim.lr": 0,
                                                          "optim.decoder_lr": 0,
                                                          "model.init_encoder": tmp_path / "moco_v2.pth.tar"})
    result = run(parse(args))
    torch.testing.assert_close(result.model.encoder_k.encoder.net.conv1.weight, source.conv1.weight)


def test_a_run_reads_well_in_a_log_file_and_in_tensorboard(synthetic_root, tmp_path):
    """stderr to a file (as under Slurm): plain lines, no carriage returns, a closing summary; TensorBoard event
    files hold the loss at every step, the other scalars and a picture of the features."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir = tmp_path / "run"
    with open(tmp_path / "stderr.txt", "w") as err:
        args = tiny_args(synthetic_root, run_dir, **{"optim.steps": 5, "data.workers": 0, "run.progress": "true",
                                                      "run.log_every": 2, "run.log_images_every": 3,
                                                      "run.log_images": 2})
        done = subprocess.run([sys.executable, "-m", "densessl.train", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=err, timeout=600)
    text = (tmp_path / "stderr.txt").read_bytes().decode()  # read_text() would turn a carriage return into \n
    assert done.returncode == 0, text[-2000:]
    assert "\r" not in text
    lines = [line for line in text.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/5", "4/5", "5/5"], text[-2000:]
    assert all("loss" in line and "pairs/s" in line and "eta" in line for line in lines)
    assert "finished step 5 of 5: 5 steps in" in text and f"tensorboard --logdir {run_dir / 'tensorboard'}" in text
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert [e.step for e in events.Scalars("loss/total")] == [1, 2, 3, 4, 5]
    assert {"lr/encoder", "speed/pairs_per_s", "speed/data_wait", "queue/fill", "pairs/redrawn",
            "pairs/fell_back"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Images("features/pca")] == [3, 5]
    assert events.Scalars("queue/fill")[-1].value == pytest.approx(5 * 4 * 8 / 256)


def test_console_commands_are_the_module_commands():
    """Each installed console command prints the same help as its ``python -m`` form."""
    import shutil
    pairs = {"densessl-train": "densessl.train", "densessl-eval": "densessl.evaluation",
             "densessl-bench": "densessl.benchmarks", "densessl-submit": "densessl.slurm.submit",
             "densessl-demo": "densessl.experiments.demo"}
    for command, module in pairs.items():
        path = shutil.which(command, path=str(Path(sys.executable).parent))
        assert path, f"{command} is not installed: pip install -e ."
        got = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120)
        want = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        assert got.returncode == want.returncode == 0, (command, got.stderr[-500:])
        options = [set(re.findall(r"--[\w-]+|\b\w+=", out.stdout)) for out in (got, want)]
        assert options[0] == options[1] and options[0], command  # usage lines wrap by the program's name


def test_demo_runs_end_to_end_at_tiny_size(tmp_path):
    from densessl.experiments.demo import main
    out = tmp_path / "demo"
    assert main(["--tiny", "--synthetic-dir", str(tmp_path / "data"), "--out", str(out), "--steps", "2", "--batch", "8",
                 "--view-size", "64"]) == 0
    report = (out / "report.md").read_text()
    for row in ("VADeR [hypercolumn]", "VADeR [dense]", "random init [hypercolumn]", "random init [dense]"):
        assert f"| {row} |" in report
    assert "strongest random baseline" in report
    assert "Depth from position alone" in report and "Depth upper bound: resnet18" in report  # depth's references
    assert (out / "depth_bound_resnet18" / "bound.json").is_file()  # kept for the next demo (depth_bound's cache)
    for png in ("loss.png", "pca.png"):
        assert (out / png).stat().st_size > 1000


def test_comparison_runs_end_to_end_at_tiny_size(tmp_path, capsys, monkeypatch):
    """``make compare`` in seconds: VADeR, MoCo v2, VADeR multi-crop and random init, a row per model and feature
    kind, finite scores, run costs for trained rows, the trivial baselines, the verdict and the plot. Called
    again, it trains and evaluates nothing: the table is rebuilt from what the run folders keep."""
    from densessl.evaluation.embedded import PROBES, score_embedded
    from densessl.experiments import scores
    from densessl.experiments.compare import main
    from densessl.experiments.scores import pretrain
    out = tmp_path / "compare"
    assert main(["--tiny", "--synthetic-dir", str(tmp_path / "data"), "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    said = capsys.readouterr().out
    assert "read back" not in said and "== depth upper bound, resnet18: training for depth, 2 steps" in said
    assert main(["--tiny", "--synthetic-dir", str(tmp_path / "data"), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert said.count("scores read back") == 7  # every model and kind, random init included
    assert "== depth upper bound, resnet18: read back" in said  # and the supervised depth bound
    assert json.loads((out / "results.json").read_text())["rows"] == rows
    # a probe whose protocol changed is run again alone, then kept: the other probes' scores are read back
    asked = []

    def recording(*args, probes, **kwargs):
        asked.append(tuple(probes))
        return score_embedded(*args, probes=probes, **kwargs)

    monkeypatch.setattr(scores, "score_embedded", recording)
    monkeypatch.setitem(PROBES, "classification", PROBES["classification"] + 1)
    assert main(["--tiny", "--synthetic-dir", str(tmp_path / "data"), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert asked == [("classification",)] * 7 and said.count("classification: protocol changed, scored again") == 7
    again = json.loads((out / "results.json").read_text())["rows"]
    rescored = ("top-1", "trivial top-1", "classification probe loss", "classification probe converged",
                "probes converged")  # the last one reads every probe, the rescored one included
    for name, row in rows.items():  # the other probes' scores are the very numbers kept
        assert {k: v for k, v in again[name]["mean"].items() if k not in rescored} == \
            {k: v for k, v in row["mean"].items() if k not in rescored}
    # scores.json in the one-protocol format of earlier versions: its probes' scores are read as their version 1
    kept = out / "runs" / "random_init_resnet18_seed0" / "scores.json"
    now = json.loads(kept.read_text())
    linear = ("segmentation", "depth", "propagation")  # what the one-protocol format kept besides the k-NN vote
    flat = {kind: {**{k: v for probe in linear for k, v in groups[probe].items()}, "probes converged": min(
        groups["segmentation"]["seg probe converged"], groups["depth"]["depth probe converged"])}
        for kind, groups in now["scores"].items()}
    old_key = json.dumps({**json.loads(now["key"]), "protocol": 1})
    kept.write_text(json.dumps({"key": old_key, "seconds": now["seconds"], "scores": flat}))
    asked.clear()
    assert main(["--tiny", "--synthetic-dir", str(tmp_path / "data"), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert asked == [("classification",)] * 2 and said.count("scores read back") == 5
    upgraded = json.loads(kept.read_text())["scores"]
    assert all(upgraded[kind][probe] == now["scores"][kind][probe] for kind in now["scores"] for probe in linear)
    assert main(["--tiny", "--synthetic-dir", str(tmp_path / "data"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("scores read back") == 7 and len(asked) == 2
    assert set(rows) == {"VADeR [hypercolumn]", "VADeR [dense]", "MoCo v2 [hypercolumn]",
                         "VADeR multi-crop [hypercolumn]", "VADeR multi-crop [dense]",
                         "random init [hypercolumn]", "random init [dense]"}  # MoCo v2 has no dense output
    runs = out / "runs" / "resnet18_4steps_batch8_64px"  # one folder per budget: no run resumes into another
    multicrop = parse(["--config", str(runs / "vader_multi_crop_seed0" / "config.yaml")])
    assert multicrop.views.crops == "2x64,4x32" and multicrop.method.name == "vader"
    for name, row in rows.items():
        assert all(math.isfinite(v) for v in row["mean"].values()), name
        assert row["random"] or (row["wall_s"][0] > 0 and row["pairs_per_s"][0] > 0), name
    table = (out / "table.md").read_text()
    assert all(f"| {name} |" in table for name in rows) and "strongest random baseline" in table
    assert "Depth from position alone" in table and "Cost: 4 runs" in table and "Partial" not in table
    against = table.split("Against random init (")[1]  # every method, not only the best, judged against random
    assert all(f"| {model} |" in against for model in ("VADeR", "MoCo v2", "VADeR multi-crop"))
    assert "Depth upper bound: resnet18 trained for depth with labels on the training scenes (2 steps" in table
    assert (out / "compare.png").stat().st_size > 10_000
    # a finished run is reused, not retrained, and reports the costs its steps had
    run_dir = runs / "vader_seed0"
    final = run_dir / "checkpoints" / "step_00000004.pt"
    written = final.stat().st_mtime_ns
    held = parse(["--config", str(run_dir / "config.yaml")])
    again = pretrain(held)
    assert final.stat().st_mtime_ns == written and [again["wall_s"]] == rows["VADeR [dense]"]["wall_s"]
    with pytest.raises(ConfigError, match=r"holds a run trained with other settings \(optim.lr\)"):
        pretrain(with_overrides(held, {"optim.lr": 0.1, "data.workers": 0, "run.progress": True}))
    # the margin-against-steps curve: its 4-step point is the comparison's VADeR run, read back
    capsys.readouterr()
    assert main(["--tiny", "--curve", "4", "2", "--synthetic-dir", str(tmp_path / "data"), "--out", str(out)]) == 0
    assert "scores read back" in capsys.readouterr().out and final.stat().st_mtime_ns == written
    points = json.loads((out / "curve.json").read_text())
    assert [p["steps"] for p in points] == [2, 4] and (out / "runs" / "resnet18_2steps_batch8_64px").is_dir()
    assert {v["metric"] for v in points[0]["verdict"]} == {"mIoU", "J&F", "RMSE", "top-1"}
    assert all(math.isfinite(v["margin"]) for p in points for v in p["verdict"])
    assert (out / "curve.png").stat().st_size > 10_000 and "| 4 |" in (out / "curve.md").read_text()


def test_ablations_run_at_tiny_size(tmp_path):
    """``make ablations`` in seconds: each reviewer question trains VADeR under its own key, the MoCo v2
    initialisation reads the MoCo v2 run of the same seed, and each gets a row."""
    from densessl.experiments.compare import main
    from densessl.experiments.presets import ABLATIONS
    out = tmp_path / "ablations"
    assert main(["--tiny", "--ablations", "--kinds", "c5", "--synthetic-dir", str(tmp_path / "data"), "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert set(rows) == {f"{label} [c5]" for label in ABLATIONS} | {"random init [c5]"}  # c5: every model has it
    assert all(0 <= row["mean"]["top-1"] <= 1 for row in rows.values())
    runs = {p.name: parse(["--config", str(p / "config.yaml")])
            for p in (out / "runs" / "resnet18_4steps_batch8_64px").iterdir()}
    assert runs["negatives__same_image__r_2__seed0"].method.negatives == "image"
    assert runs["no_momentum_encoder_seed0"].method.momentum == 0
    simclr = runs["no_momentum_encoder__in_batch_negatives__simclr_style__seed0"]
    assert simclr.method.momentum == 0 and simclr.method.negatives == "batch"
    assert runs["table_3__unmatched_positives_seed0"].method.positives == "unmatched"
    assert runs["table_3__same_view_seed0"].views.same_window is True
    r2, r3 = runs["r2__moco_v2_continued_from_moco_v2_seed0"], runs["r3__moco_v2_on_vader_multi_crop_s_crops_seed0"]
    assert r2.method.name == "mocov2" and Path(r2.model.init_encoder).parent.parent.name == "moco_v2_seed0"
    assert r3.method.name == "mocov2" and r3.views.crops == "2x64,4x32"  # VADeR multi-crop's crops in make compare
    assert runs["8_matches_per_pair_seed0"].views.num_matches == 8
    assert runs["queue_1_024_seed0"].method.queue_size == 1024
    assert Path(runs["init_moco_v2_seed0"].model.init_encoder).parent.parent.name == "moco_v2_seed0"
    assert runs["moco_v2_seed0"].method.name == "mocov2" and runs["moco_v2_seed0"].method.temperature == 0.2
    assert "Against VADeR" in (out / "table.md").read_text() and "1 seed: no spread" in (out / "table.md").read_text()


def test_ablation_differences_within_their_spread_are_marked():
    """The ablation table's 'against VADeR' part: best read-out against best read-out, RMSE's sign flipped so
    that positive is better, and a difference no larger than the larger std marked as no answer."""
    from densessl.experiments.tables import against

    def row(model, kind, miou, jf, rmse, std, random=False):
        mean = {"mIoU": miou, "J&F": jf, "RMSE": rmse, "top-1": 0.5}
        return {"model": model, "kind": kind, "random": random, "seeds": {0: {}, 1: {}}, "mean": mean,
                "std": {k: std for k in mean}}

    rows = {"VADeR [hypercolumn]": row("VADeR", "hypercolumn", 0.40, 0.60, 0.50, 0.01),
            "VADeR [dense]": row("VADeR", "dense", 0.30, 0.80, 0.70, 0.01),
            "other [hypercolumn]": row("other", "hypercolumn", 0.35, 0.805, 0.45, 0.02),
            "random init [hypercolumn]": row("random init", "hypercolumn", 0.9, 0.9, 0.1, 0.0, random=True)}
    line = next(x for x in against(rows, "VADeR").splitlines() if x.startswith("| other |"))
    cells = [c.strip() for c in line.strip("|").split("|")][1:]
    assert cells == ["-0.050 ± 0.020", "+0.005 ± 0.020 (within spread)", "+0.050 ± 0.020",
                     "+0.000 ± 0.020 (within spread)"]
    # the verdict against random init reads spreads the same way
    from densessl.experiments.tables import verdict
    rows["random init [hypercolumn]"] = row("random init", "hypercolumn", 0.39, 0.70, 0.44, 0.02, random=True)
    lines = {v["metric"]: v["line"] for v in verdict(rows)}
    assert lines["mIoU"].endswith("+0.010 ± 0.020 (within spread)") and lines["J&F"].endswith("(better)")
    assert lines["RMSE"].endswith("-0.010 ± 0.020 (within spread)")


def test_the_table_names_every_seed_whose_probe_loses_to_its_trivial_baseline():
    """A row whose mean beats the trivial baseline can hide a seed that does not: the table names that seed."""
    from densessl.experiments.tables import table
    trivial = {"trivial mIoU": 0.2, "trivial RMSE": 1.4, "trivial top-1": 0.25}

    def scores(top1):
        return {"mIoU": 0.4, "RMSE": 0.6, "delta1": 0.8, "J&F": 0.7, "J": 0.7, "F": 0.7, "top-1": top1,
                "probes converged": 1.0, **trivial}

    seeds = {"0": scores(0.5), "1": scores(0.24)}
    mean = {k: (seeds["0"][k] + seeds["1"][k]) / 2 for k in seeds["0"]}
    rows = {"m [dense]": {"model": "m", "kind": "dense", "random": True, "seeds": seeds, "mean": mean,
                          "std": dict.fromkeys(mean, 0.0)}}
    assert mean["top-1"] > trivial["trivial top-1"]
    assert "Probes NOT beating their trivial baseline: m [dense] seed 1 (top-1)." in table(rows, "# t")
    seeds["1"] = scores(0.3)
    assert "Every probe beats its trivial baseline in every seed" in table(rows, "# t")


@pytest.mark.gpu
def test_gpu_training_steps_with_bf16_and_channels_last(synthetic_root, tmp_path):
    from densessl.train.trainer import run
    model = run(parse(tiny_args(synthetic_root, tmp_path / "gpu", **{"optim.steps": 3, "run.amp": "true",
                                                                     "run.channels_last": "true"}))).model
    assert next(model.parameters()).is_cuda
    assert (tmp_path / "gpu" / "checkpoints" / "step_00000003.pt").exists()


@pytest.mark.parametrize("backend,module", [("dali", "nvidia.dali"), ("ffcv", "ffcv")])
def test_trains_with_each_backend(synthetic_root, tmp_path, backend, module):
    if not os.environ.get("DENSESSL_REQUIRE_BACKENDS"):
        pytest.importorskip(module)
    from densessl.train.trainer import run
    args = tiny_args(synthetic_root, tmp_path / backend, **{"optim.steps": 3, "data.backend": backend})
    model = run(parse(args)).model
    assert int(model.queue_dense_ptr) == 3 * 4 * 8 % 256
    assert len(losses(tmp_path / backend)) == 3


def test_vader_trains_on_multicrop_views_and_resumes_exactly(synthetic_root, tmp_path):
    """views.crops: every view embeds at its own stride 4, every matched pair adds its keys, and a run resumed
    from a checkpoint continues with the uninterrupted run's losses."""
    import shutil

    from densessl.train.trainer import run
    multicrop = {"views.crops": "2x64,2x32", "views.min_cells": 16, "views.num_matches": 8, "optim.steps": 4,
                 "method.queue_size": 640, "run.checkpoint_every": 2, "run.keep_checkpoints": 2, "data.workers": 0}
    def args(run_dir, **extra):  # the tiny run, its views section replaced
        return [a for a in tiny_args(synthetic_root, run_dir, **multicrop, **extra) if not a.startswith("views.")] + \
            [f"{k}={v}" for k, v in multicrop.items() if k.startswith("views.")]
    full = run(parse(args(tmp_path / "full")))
    assert full.step == 4 and int(full.model.queue_dense_ptr) == 4 * 4 * 5 * 8 % 640  # 5 pairs x 8 keys a sample
    (tmp_path / "cut" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "full" / "checkpoints" / "step_00000002.pt", tmp_path / "cut" / "checkpoints")
    run(parse(args(tmp_path / "cut", **{"run.resume": "auto"})))
    full_losses, cut_losses = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert [cut_losses[s] for s in (3, 4)] == [full_losses[s] for s in (3, 4)]


def test_make_demo_and_evaluation_read_well_in_a_log_file(tmp_path):
    """``make demo``'s commands with their output in a file (as ``make demo > log``): the data generation, the
    training, the evaluation's feature extraction and ``evaluation all`` print plain lines, no carriage return."""
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        demo = subprocess.run([sys.executable, "-m", "densessl.experiments.demo", "--tiny", "--synthetic-dir",
                               str(tmp_path / "data"), "--out", str(tmp_path / "demo"), "--steps", "2", "--batch",
                               "8", "--view-size", "64"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=900)
        evaluation = subprocess.run([sys.executable, "-m", "densessl.evaluation", "all", "--checkpoint",
                                     str(tmp_path / "demo"), "--root", str(tmp_path / "data"), "--probe-steps", "3",
                                     "--size", "64", "96", "--depth-bound-steps", "2", "--out", str(tmp_path / "eval")], cwd=REPO, stdout=out,
                                    stderr=subprocess.STDOUT, timeout=900)
    text = log.read_bytes().decode()  # read_text() would turn a carriage return into \n
    assert evaluation.returncode == 0 and demo.returncode in (0, 1), text[-3000:]  # 1: the tiny run won nothing
    assert "\r" not in text
    assert "synthetic scenes: " in text and "features: " in text, text[-3000:]
