"""Downstream evaluation of frozen dense features.

    python -m densessl.evaluation all --checkpoint runs/demo       # newest checkpoint of a run; embedded set; one table
    python -m densessl.evaluation segmentation --dataset voc --root VOCdevkit/VOC2012 --features checkpoint:CKPT random:resnet50
    python -m densessl.evaluation depth --dataset nyu --root nyu_depth_v2 --features checkpoint:CKPT torchvision:r50.pth
    python -m densessl.evaluation propagation --dataset davis --root DAVIS --features checkpoint:CKPT mocov2:moco.pth.tar
    python -m densessl.evaluation visualize --features checkpoint:CKPT random:resnet18 --images a.jpg b.jpg c.jpg
    python -m densessl.evaluation export --checkpoint CKPT --out exported/

``--features`` takes any number of extractors (see evaluation/features.py), so baselines run the same code.
Results are printed as a markdown table and written to ``--out`` (results.json, table.md, figures).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from densessl.model import checkpoint as checkpoints
from densessl.pipeline import owned

from . import datasets
from .depth_bound import BOUND_STEPS, depth_upper_bound, describe
from .embedded import EmbeddedTasks, flat_scores, position_depth, score_embedded
from .features import KINDS, feature_extractors
from .metrics import DEPTH_METRICS
from .probe import linear_probe, warn_if_unreliable
from .propagation import evaluate_videos
from .report import markdown_table
from .visualize import plot_pca, plot_retrieval

SEGMENTATION = {"voc": (datasets.voc, "train", "val"), "cityscapes": (datasets.cityscapes, "train", "val"),
                "synthetic": (datasets.synthetic, "train", "val")}
DEPTH = {"nyu": (datasets.nyu_depth, "train", "test"),
         "synthetic": (lambda root, split: datasets.synthetic(root, split, "depth"), "train", "val")}
VIDEOS = {"davis": lambda root: datasets.davis(root, "val"), "synthetic": datasets.synthetic_videos}


def _table(rows: dict[str, dict[str, float]], metrics: list[str]) -> str:
    """A markdown table; a row without a metric (a depth-only row) shows '-' there."""
    return markdown_table(metrics, {name: [f"{r[m]:.3f}" if m in r else "-" for m in metrics]
                                    for name, r in rows.items()})


def probe_row(result: dict, metric: str, label: str) -> dict[str, float]:
    """A probe result as table columns: the metric, the trivial baseline's, and the probe's final loss (with
    ``probe.warn_if_unreliable``'s warnings)."""
    warn_if_unreliable(result, metric, label)
    return {metric: result[metric], f"trivial {metric}": result["trivial"][metric],
            "probe loss": result["probe loss"]}


def _report(rows: dict, metrics: list[str], out: Path, title: str, notes: str = "") -> str:
    out.mkdir(parents=True, exist_ok=True)
    table = _table(rows, metrics) + (f"\n\n{notes}" if notes else "")
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    (out / "table.md").write_text(f"# {title}\n\n{table}\n")
    print(f"{title}\n{table}\n(written to {out})")
    return table


def run_all(checkpoint: str, data: str, out: Path, size, steps: int, device, kinds=("hypercolumn", "dense"),
            bound_steps: int = BOUND_STEPS) -> dict:
    """Segmentation mIoU, depth RMSE, propagation J/F and the shape classifier's top-1 (``classify``) on the
    embedded set: checkpoint vs random init, each read as every feature kind asked for; and depth's two
    references: from position alone, and the supervised upper bound (``depth_bound``; ``bound_steps`` 0: none)."""
    path = checkpoints.find(checkpoint)
    arch = checkpoints.read(path)["model_config"]["arch"]
    out.mkdir(parents=True, exist_ok=True)
    extractors = feature_extractors([f"checkpoint:{path}", f"random:{arch}"], arch, device, kinds)
    tasks = EmbeddedTasks.load(data)
    rows = {}
    for name, fn in extractors.items():
        r = flat_scores(score_embedded(fn, tasks, name, size, steps))
        rows[name] = {"seg mIoU": r["mIoU"], "depth RMSE (m)": r["RMSE"], "depth delta1": r["delta1"], "J": r["J"],
                      "F": r["F"], "J&F": r["J&F"], "shape top-1": r["top-1"]}
    where = position_depth(tasks, size)
    rows["depth from position alone"] = {"depth RMSE (m)": where["RMSE"], "depth delta1": where["delta1"]}
    notes = "Depth from position alone: a probe that sees each pixel's row and column, nothing of the image."
    if bound_steps:
        bound = depth_upper_bound(arch, tasks.depth, size, bound_steps, device)
        rows[f"supervised depth {arch}, {bound_steps} steps (upper bound) [hypercolumn]"] = {
            "depth RMSE (m)": bound["RMSE"], "depth delta1": bound["delta1"], "cost (min)": bound["seconds"] / 60}
        notes += "\n\n" + describe(bound)
    plot_pca(extractors, tasks.segmentation[1].images[:6], out / "pca.png", size)
    plot_retrieval(extractors, tasks.segmentation[1].images[:5], out / "retrieval.png", size)
    _report(rows, ["seg mIoU", "depth RMSE (m)", "depth delta1", "J", "F", "J&F", "shape top-1"], out,
            f"Embedded set, frozen features: {checkpoints.run_and_step(path)} vs random init", notes)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m densessl.evaluation", description=__doc__.split("\n\n")[0])
    p.add_argument("protocol", choices=["all", "segmentation", "depth", "propagation", "visualize", "export"])
    p.add_argument("--checkpoint", help="our training checkpoint (all, export)")
    p.add_argument("--features", nargs="+", default=[], help="extractors: checkpoint:P random:ARCH torchvision:P "
                                                             "mocov2:P timm:P")
    p.add_argument("--arch", default="resnet50",
                   help="architecture of torchvision/mocov2/timm weights (a ResNet or a timm ViT name)")
    p.add_argument("--kinds", nargs="+", default=["hypercolumn", "dense"], choices=KINDS,
                   help="how each model is read (evaluation/features.py): hypercolumn = C2..C5 at stride 4, the "
                        "same for every model; dense = the method's dense output; c5 = the last stage")
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--root", default="data/synthetic", help="data set root (default: the embedded set)")
    p.add_argument("--images", nargs="+", default=[], help="images for visualize")
    p.add_argument("--size", type=int, nargs=2, default=(128, 160), metavar=("H", "W"), help="probe input size")
    p.add_argument("--probe-steps", type=int, default=300, help="segmentation probe: most L-BFGS iterations")
    p.add_argument("--depth-bound-steps", type=int, default=BOUND_STEPS,
                   help="all: steps the depth upper bound trains the checkpoint's architecture for depth, with "
                        "labels (evaluation/depth_bound.py; minutes on a CPU); 0: no bound")
    p.add_argument("--save-masks", action="store_true", help="propagation: write the predicted masks to "
                   "OUT/masks/<features>/<video>/<frame>.png (DAVIS's results layout, for its official code)")
    p.add_argument("--out", default="runs/eval")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the networks run (default: the GPU when there is one)")
    args = p.parse_args(argv)
    out, size, device = Path(args.out), tuple(args.size), torch.device(args.device)
    if any(s % 32 for s in size):  # a ViT pads to its patch (evaluation.features)
        p.error(f"--size {size[0]} {size[1]}: both must be multiples of 32 (a ResNet's stride)")
    try:
        if args.protocol in ("all", "export") and not args.checkpoint:
            p.error(f"{args.protocol} needs --checkpoint")
        owned.claim(out, "evaluation", "--out")
        if args.protocol == "all":
            if args.depth_bound_steps < 0:
                p.error(f"--depth-bound-steps {args.depth_bound_steps}: give 0 (no bound) or more")
            run_all(args.checkpoint, args.root, out, size, args.probe_steps, device, args.kinds,
                    args.depth_bound_steps)
            return 0
        if args.protocol == "export":
            from .export import export
            for path in export(args.checkpoint, out):
                print(f"wrote {path}")
            return 0
        if not args.features:
            p.error(f"{args.protocol} needs --features")
        extractors = feature_extractors(args.features, args.arch, device, args.kinds)
        if args.protocol == "visualize":
            if len(args.images) < 2:
                p.error("visualize needs --images (two or more)")
            out.mkdir(parents=True, exist_ok=True)
            plot_pca(extractors, [Path(i) for i in args.images], out / "pca.png", size)
            plot_retrieval(extractors, [Path(i) for i in args.images], out / "retrieval.png", size)
            print(f"wrote {out / 'pca.png'} and {out / 'retrieval.png'}")
            return 0
        table = {"segmentation": SEGMENTATION, "depth": DEPTH, "propagation": VIDEOS}[args.protocol]
        if args.dataset not in table:
            p.error(f"{args.protocol} datasets: {', '.join(table)}")
        if args.protocol == "propagation":
            videos = table[args.dataset](args.root)
            rows = {name: evaluate_videos(fn, videos, save_masks=out / "masks" / re.sub(r"[^\w.-]+", "_", name)
                                          if args.save_masks else None)
                    for name, fn in extractors.items()}
            metrics = ["J&F", "J", "J recall", "J decay", "F", "F recall", "F decay"]
        else:
            reader, train_split, test_split = table[args.dataset]
            train, test = reader(args.root, train_split), reader(args.root, test_split)
            metric = "mIoU" if args.protocol == "segmentation" else "RMSE"
            rows = {}
            for name, fn in extractors.items():
                result = linear_probe(fn, train, test, size, args.probe_steps)
                rows[name] = {**result, **probe_row(result, metric, name)}
            metrics = ((["mIoU"] if args.protocol == "segmentation" else list(DEPTH_METRICS))
                       + [f"trivial {metric}", "probe loss"])
        _report(rows, metrics, out, f"{args.protocol} on {args.dataset} ({args.root})")
        return 0
    except owned.NotOurs as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
