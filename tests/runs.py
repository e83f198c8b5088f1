"""Tiny training runs shared by the test modules (test modules do not import each other: test_layers.py)."""

import csv
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tiny_args(synthetic_root, run_dir, **extra):
    """``section.key=value`` arguments of a tiny CPU run; ``extra`` takes dotted keys: ``**{"optim.steps": 3}``."""
    args = {"data.path": synthetic_root / "train", "model.arch": "resnet18", "views.size": 64,
            "optim.batch_size": 4, "data.workers": 2, "method.queue_size": 256, "views.num_matches": 8,
            "views.min_matches": 8, "run.dir": run_dir, "run.progress": "false", "run.checkpoint_every": 1,
            "optim.lr": 0.1, "optim.decoder_lr": 0.1, **extra}
    return [f"{k}={v}" for k, v in args.items()]


def losses(run_dir):
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


def run_train(args, **kw):
    return subprocess.run([sys.executable, "-m", "densessl.train", *args], cwd=REPO, capture_output=True, text=True,
                          **kw)
