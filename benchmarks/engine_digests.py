"""Digests of what the view engine produces today, recorded so that a restructuring (issue 38, "One view engine")
can be shown to change no behaviour: record before it, compare after every commit.

    python -m densessl.benchmarks.engine_digests --out before.json [--quick] [--only NAME ...]
    python -m densessl.benchmarks.engine_digests --out after.json [--quick]
    python -m densessl.benchmarks.engine_digests --compare before.json after.json   # exit 1: something differs

What it records (the JSON's ``entries``; everything follows from ``--seed``: the same code and machine write the
same entries):

- ``loader/<backend>/<views>/<phase>``: the batches (4 samples, 2 workers) ``pipeline.build_loader`` yields for
  backend ``torch``, ``ffcv`` (a .beton written from the images, JPEG, as the trainer writes it) and ``dali`` (its
  CPU graph: device None), for ``<views>`` ``pairs``, ``pairs_same_window`` and ``multicrop`` (2x64 + 4x32;
  ``VIEWS``), on the embedded synthetic set in two image shapes (20 landscape and 12 portrait images, generated
  into a fresh temporary folder). Phases: ``epoch0``, ``epoch1`` and ``epoch2`` of one loader, and ``resume``: a
  second loader built with ``state=`` the first one's ``state_dict()`` taken half-way through epoch 1
  (``resume_from`` batches read), read on to the end of epoch 2, as the trainer resumes; ``matches_uninterrupted``
  says whether it saw the first loader's batches. A phase holds its number of batches, a digest of each batch
  (``per_batch``), one of those (``all``), and a digest per batch key over the phase (``keys``). A batch's digest
  covers every tensor it holds, by sorted key: the key, dtype, shape and values (not the memory layout).
- ``train/<run>``: ``train.trainer.run`` on the CPU (``--threads`` torch threads, 1: results depend on it; the
  runs come first, before FFCV, which changes torch's threads, and DALI are imported) for ``--steps`` steps (50,
  or 5 with ``--quick``) of a tiny configuration (ResNet-18, 64 px views, batch 4, torch loader: ``BASE``) on those
  images, ``run.resume=""``, each run in a fresh folder: the loss of every step exactly (``Trainer.step``'s
  value; JSON keeps a float's every bit), a digest of the final weights (every parameter and buffer but the
  queues, BatchNorm statistics included, by name) and one of the queues and their pointers. Runs (``RUNS``):
  VADeR with each ``negatives``, ``positives=unmatched``, ``symmetric``, ``same_window`` and multi-crop views;
  DenseCL with its dense term switched on half-way; MoCo v2 on pairs and on multi-crop views.

``settings`` (steps, seed, threads) must be equal for two files to be comparable. ``info`` is recorded and not
compared: versions, commit, machine, seconds taken, and each loader's mid-epoch ``state_dict()`` (bytes as
base64), for checking later that old states still resume. Digests are of this machine's arithmetic and of these
library versions: compare files written on the same machine. ``--compare`` prints every differing leaf
(``loader/dali/pairs/epoch1/keys/view2``, ``train/densecl/losses/17``) and exits 1 if there is any; entries
one file lacks count as differences unless that file was written with ``--only``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch

from densessl.pipeline import PairSpec, build_loader
from densessl.pipeline.views import MultiCropViews
from densessl.pipeline.synthetic import VERSION, SyntheticConfig, generate

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("torch", "ffcv", "dali")  # FFCV before DALI, as the test suite imports them
VIEWS = {"pairs": PairSpec(size=64, num_matches=8, min_matches=64),
         "pairs_same_window": PairSpec(size=64, num_matches=8, min_matches=64, same_window=True),
         "multicrop": MultiCropViews(crops="2x64,4x32", min_cells=16, num_matches=8).view_spec}
# two shapes of the embedded set, copied into one ImageFolder: 20 landscape and 12 portrait images
SETS = {"l": SyntheticConfig(height=96, width=128, train_per_class=5, val_per_class=1, videos=1, frames=2),
        "p": SyntheticConfig(height=128, width=80, train_per_class=3, val_per_class=1, videos=1, frames=2, seed=1)}
BASE = {"model.arch": "resnet18", "views.size": 64, "views.num_matches": 8, "views.min_matches": 8,
        "optim.batch_size": 4, "optim.lr": 0.1, "optim.decoder_lr": 0.1, "method.queue_size": 256,
        "data.workers": 0, "run.device": "cpu", "run.resume": "", "run.progress": "false",
        "run.tensorboard": "false", "run.log_images": 0}
MULTICROP = {"views.crops": "2x64,4x32", "views.min_cells": 16, "views.num_matches": 8, "method.queue_size": 576}
RUNS = {"vader_queue": {"method.name": "vader"},
        "vader_image": {"method.name": "vader", "method.negatives": "image"},
        "vader_batch": {"method.name": "vader", "method.negatives": "batch"},
        "vader_unmatched": {"method.name": "vader", "method.positives": "unmatched"},
        "vader_symmetric": {"method.name": "vader", "method.symmetric": "true"},
        "vader_same_window": {"method.name": "vader", "views.same_window": "true"},
        "vader_multicrop": {"method.name": "vader", **MULTICROP},
        "densecl": {"method.name": "densecl", "method.warmup_steps": "HALF_THE_STEPS"},
        "mocov2": {"method.name": "mocov2"},
        "mocov2_multicrop": {"method.name": "mocov2", **MULTICROP}}


def _update(h, key: str, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of named tensors, by sorted name: each name, dtype, shape and values."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        _update(h, key, tensors[key])
    return h.hexdigest()


class Phase:
    """The digests of a run of batches: one per batch and one per key over them all."""

    def __init__(self):
        self.batches, self.keys = [], {}

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        self.batches.append(tensors_digest(batch))
        for key, t in batch.items():
            _update(self.keys.setdefault(key, hashlib.sha256()), key, t)

    def record(self) -> dict:
        return {"batches": len(self.batches), "all": hashlib.sha256("".join(self.batches).encode()).hexdigest(),
                "per_batch": self.batches, "keys": {k: h.hexdigest() for k, h in sorted(self.keys.items())}}


def make_images(tmp: Path) -> Path:
    """One ImageFolder of the ``SETS`` training images (each generated into its own fresh folder)."""
    root = tmp / "images"
    for prefix, cfg in SETS.items():
        train = generate(tmp / f"synthetic_{prefix}", cfg, progress=False) / "train"
        for file in sorted(train.glob("*/*.jpg")):
            (root / file.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, root / file.parent.name / f"{prefix}_{file.name}")
    return root


def loader_entries(images: Path, tmp: Path, seed: int, selected) -> tuple[dict, dict]:
    """``loader/...`` entries (module docstring) and, per loader, its mid-epoch state."""
    entries, states = {}, {}
    for backend in BACKENDS:
        names = [f"loader/{backend}/{views}" for views in VIEWS]
        if not any(selected(n) for n in names):
            continue
        data = images
        if backend == "ffcv":
            from densessl.pipeline.ffcv import write_beton
            with contextlib.redirect_stderr(io.StringIO()):  # FFCV's progress bar
                data = write_beton(images, tmp / "images.beton")
        for name, (views, spec) in zip(names, VIEWS.items()):
            if not selected(name):
                continue
            def build(state=None):
                return build_loader(backend, data, spec, batch_size=4, workers=2, seed=seed, state=state)
            first, phases = build(), {}
            k = max(1, len(first) // 2)  # the resume point: batches of epoch 1 read
            for epoch in range(3):
                phase = phases[f"epoch{epoch}"] = Phase()
                for batch in first:
                    phase.add(batch)
                    if epoch == 1 and len(phase.batches) == k:
                        state = first.state_dict()
            resumed, phase = build(state), Phase()
            for _ in range(2):  # the rest of epoch 1, then epoch 2
                for batch in resumed:
                    phase.add(batch)
            entries.update({f"{name}/{key}": p.record() for key, p in phases.items()})
            entries[f"{name}/resume"] = {**phase.record(), "resume_from": k, "matches_uninterrupted":
                                         phase.batches == phases["epoch1"].batches[k:] + phases["epoch2"].batches}
            states[name] = {key: base64.b64encode(value).decode() if isinstance(value, bytes) else value
                            for key, value in state.items()}
    return entries, states


@contextlib.contextmanager
def recorded_losses():
    """The value of every ``Trainer.step`` while inside (a float: the trainer synchronises every step here)."""
    from densessl.train import trainer
    losses, step = [], trainer.Trainer.step

    def recording(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        losses.append(float(out[0]))
        return out
    trainer.Trainer.step = recording
    try:
        yield losses
    finally:
        trainer.Trainer.step = step


def train_entry(images: Path, run_dir: Path, overrides: dict, steps: int, seed: int) -> dict:
    """One ``train/...`` entry (module docstring): ``overrides`` over ``BASE``."""
    from densessl.train.config import parse
    from densessl.train.trainer import run
    args = {**BASE, "data.path": images, "run.dir": run_dir, "optim.steps": steps, "run.seed": seed,
            "run.checkpoint_every": steps, **overrides}
    if "views.crops" in args:  # multi-crop: the crops set the views
        args = {k: v for k, v in args.items() if not k.startswith("views.") or k in MULTICROP}
    args = {k: steps // 2 if v == "HALF_THE_STEPS" else v for k, v in args.items()}
    out = io.StringIO()  # the trainer's lines, shown only if it fails
    try:
        with recorded_losses() as losses, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            model = run(parse([f"{k}={v}" for k, v in args.items()])).model
    except BaseException:
        print(out.getvalue(), file=sys.stderr)
        raise
    state = model.state_dict()
    queues = {k: v for k, v in state.items() if k.startswith("queue")}
    return {"steps": len(losses), "losses": losses, "queues": tensors_digest(queues),
            "weights": tensors_digest({k: v for k, v in state.items() if k not in queues})}


def info(label: str | None) -> dict:
    """What was recorded (``label``, or the source tree's ``git describe``) and what the digests depend on besides
    the code: library versions, the synthetic set's version, the machine."""
    versions = {"python": platform.python_version(), "synthetic_set": VERSION}
    for dist in ("torch", "numpy", "numba", "simplejpeg", "pillow", "opencv-python", "ffcv", "nvidia-dali-cuda130"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    git = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True)
    return {"versions": versions, "commit": label or git.stdout.strip() or None, "cpu": platform.processor() or
            platform.machine(), "cpus": os.cpu_count()}


def record(args) -> dict:
    """Every selected entry (module docstring), with the settings and information the JSON holds."""
    steps = args.steps or (5 if args.quick else 50)
    selected = (lambda name: any(s in name for s in args.only)) if args.only else (lambda name: True)
    entries, seconds = {}, {}
    with tempfile.TemporaryDirectory(prefix="engine_digests_") as tmp:
        tmp = Path(tmp)
        images = make_images(tmp)
        for name, overrides in RUNS.items():  # first: before FFCV and DALI are imported
            if selected(f"train/{name}"):
                start = time.perf_counter()
                torch.set_num_threads(args.threads)  # FFCV's loader sets it to its workers: set it for every run
                entries[f"train/{name}"] = train_entry(images, tmp / "runs" / name, overrides, steps, args.seed)
                seconds[f"train/{name}"] = round(time.perf_counter() - start, 1)
                print(f"train/{name}: {seconds[f'train/{name}']} s", file=sys.stderr, flush=True)
        start = time.perf_counter()
        loaders, states = loader_entries(images, tmp, args.seed, selected)
        entries.update(loaders)
        seconds["loaders"] = round(time.perf_counter() - start, 1)
    return {"settings": {"steps": steps, "seed": args.seed, "threads": args.threads, "only": args.only or []},
            "entries": entries, "info": {**info(args.label), "seconds": seconds, "loader_states": states}}


def table(result: dict) -> str:
    """A short summary: per loader, batches per phase, digests of epochs 0 and 1 and of the resume; per run, the
    first and last loss and the digests of weights and queues (first 12 hex digits)."""
    entries, lines = result["entries"], []
    loaders = sorted({n.rsplit("/", 1)[0] for n in entries if n.startswith("loader/")})
    if loaders:
        lines.append(f"{'loader':34} {'batches':>8}  {'epoch0':12}  {'epoch1':12}  {'resume':12}  resumes exactly")
    for name in loaders:
        phases = [entries[f"{name}/{p}"] for p in ("epoch0", "epoch1", "epoch2", "resume")]
        digest = [p["all"][:12] for p in (phases[0], phases[1], phases[3])]
        lines.append(f"{name:34} {'/'.join(str(p['batches']) for p in phases):>8}  {'  '.join(digest)}  "
                     f"{'yes' if phases[3]['matches_uninterrupted'] else 'NO'}")
    runs = [n for n in entries if n.startswith("train/")]
    if runs:
        lines.append(f"{'run':34} {'steps':>8}  {'first loss':>12}  {'last loss':>12}  {'weights':12}  queues")
    for name in runs:
        e = entries[name]
        lines.append(f"{name:34} {e['steps']:>8}  {e['losses'][0]:>12.6g}  {e['losses'][-1]:>12.6g}  "
                     f"{e['weights'][:12]}  {e['queues'][:12]}")
    return "\n".join(lines)


def leaves(value, prefix: str = "") -> dict:
    """``{"a/b/0": leaf}`` for nested dicts and lists."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in leaves(item, f"{prefix}/{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in leaves(item, f"{prefix}/{i}").items()}
    return {prefix.lstrip("/"): value}


def compare(path_a: Path, path_b: Path, show: int = 60) -> int:
    """Print how two recorded files differ, leaf by leaf; 0 when they agree, 1 otherwise."""
    a, b = (json.loads(Path(p).read_text()) for p in (path_a, path_b))
    problems = [f"settings {k}: {a['settings'].get(k)!r} != {b['settings'].get(k)!r}"
                for k in ("steps", "seed", "threads") if a["settings"].get(k) != b["settings"].get(k)]
    for name in sorted(set(a["entries"]) ^ set(b["entries"])):
        lacking = "B" if name in a["entries"] else "A"
        if not (b if lacking == "B" else a)["settings"].get("only"):  # not left out on purpose
            problems.append(f"{name}: not in {lacking}")
    common = sorted(set(a["entries"]) & set(b["entries"]))
    differ = []
    for name in common:
        la, lb = leaves(a["entries"][name], name), leaves(b["entries"][name], name)
        diffs = [f"{k}: {la.get(k, '<absent>')!r} != {lb.get(k, '<absent>')!r}" for k in sorted(set(la) | set(lb))
                 if la.get(k, "<absent>") != lb.get(k, "<absent>")]
        differ += [name] if diffs else []
        problems += diffs
    print(f"A: {path_a} (commit {a['info'].get('commit')})\nB: {path_b} (commit {b['info'].get('commit')})")
    for line in problems[:show]:
        print("  " + line)
    if len(problems) > show:
        print(f"  ... and {len(problems) - show} more")
    print(f"{len(common)} entries in both: " + (f"{len(differ)} differ: {', '.join(differ)}" if differ else
                                                "all identical"))
    if problems and not differ:
        print("the files are not comparable as they stand (settings or entries above)")
    return 1 if problems else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="write the recorded digests to this JSON file")
    p.add_argument("--quick", action="store_true", help="5 training steps instead of 50")
    p.add_argument("--steps", type=int, default=0, help="training steps (overrides --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it)")
    p.add_argument("--only", action="append", help="record only entries whose name contains this (repeatable)")
    p.add_argument("--label", help="what code this records, e.g. a commit (default: git describe of the tree)")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"), help="compare two recorded files")
    args = p.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        p.error("give --out FILE.json or --compare A.json B.json")
    result = record(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
