"""`make demo`: pretrain VADeR on the embedded set on CPU, then hold its features against random init.

Generates the synthetic set, trains resnet18 + FPN (a few minutes on 2 cores; resumes if interrupted), and
scores the trained and a randomly initialised network, each read two ways (its encoder's hypercolumn and its
FPN output), by the comparison's protocols (``experiments/compare.py``): segmentation and depth probes, label
propagation, and the shape classifier. Writes ``report.md`` with the table, the verdict against the strongest
random baseline, depth's two references (from position alone, and the supervised upper bound, trained once and
kept in ``OUT/depth_bound_resnet18``), a loss curve and PCA-of-features images. Exits with status 1 if the
trained model does not beat the strongest random baseline on any of the scores.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import matplotlib.pyplot as plt

from densessl.evaluation.datasets import synthetic
from densessl.evaluation.depth_bound import describe
from densessl.evaluation.embedded import PROBE_SIZE, EmbeddedTasks, describe_position, position_depth
from densessl.evaluation.features import model_extractors
from densessl.evaluation.visualize import plot_pca
from densessl.pipeline.owned import NotOurs
from densessl.pipeline.synthetic import SyntheticConfig, generate
from densessl.train.config import ConfigError, with_overrides

from .presets import PRESETS, TINY, TINY_DATA, base_config
from .scores import depth_bound, evaluate, pretrain, random_baseline
from .tables import summarise, table, verdict

KINDS = ("hypercolumn", "dense")


def plot_loss(metrics: Path, out: Path) -> None:
    with open(metrics, newline="") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot(steps, [float(r["loss"]) for r in rows])
    ax[0].set(xlabel="step", ylabel="VADeR loss (x10 InfoNCE)", title="training loss")
    ax[1].plot(steps, [100 * float(r["data_wait"]) for r in rows])
    ax[1].set(xlabel="step", ylabel="% of step time", title="time waiting for data")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--synthetic-dir", default="data/synthetic",
                   help="the folder the embedded data set is written to (new, empty, or written by densessl "
                        "before); never a data set of yours: it is replaced when its settings differ")
    p.add_argument("--data", help=argparse.SUPPRESS)  # the old name of --synthetic-dir, refused
    p.add_argument("--steps", type=int, default=PRESETS["cpu"]["steps"], help="default: make compare's budget")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--view-size", type=int, default=PRESETS["cpu"]["view_size"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="where training and the probes run (auto: the GPU when there is one)")
    p.add_argument("--depth-bound-steps", dest="bound_steps", type=int,
                   help="steps the supervised depth upper bound trains resnet18 for depth (default: make "
                        "compare's; 0: none)")
    p.add_argument("--tiny", action="store_true", help="a seconds-long run on a tiny data set (tests)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.bound_steps is None:
        args.bound_steps = (TINY if args.tiny else PRESETS["cpu"])["bound_steps"]
    if args.bound_steps < 0:
        p.error(f"--depth-bound-steps {args.bound_steps}: give 0 (no bound) or more")

    if args.data:
        p.error("--data is now --synthetic-dir: the folder the embedded set is written to (not a data set of yours)")
    root = generate(args.synthetic_dir, TINY_DATA if args.tiny else SyntheticConfig(), option="--synthetic-dir")
    cfg = with_overrides(base_config(root, args), {"run.dir": str(out), "run.progress": True, "run.log_images": 4,
                                                   "run.checkpoint_every": 50})
    trained = pretrain(cfg)
    model = trained.pop("model")
    device = next(model.parameters()).device  # where training ran: the features are computed there too
    seed = cfg.run.seed
    scores, eval_s = evaluate(model, root, device, KINDS, out, trained["checkpoint"])
    # the network this run started from
    baseline, random_result = random_baseline(cfg.model.arch, seed, root, device, KINDS, out / "random_init")
    results = [{"model": "VADeR", "seed": seed, "random": False, **trained, "eval_s": eval_s, "scores": scores},
               random_result]
    rows = summarise(results)
    plot_loss(out / "metrics.csv", out / "loss.png")
    extractors = {**{f"VADeR [{k}]": f for k, f in model_extractors(model, KINDS).items()},
                  **{f"random init [{k}]": f.to(device) for k, f in model_extractors(baseline, KINDS).items()}}
    test_images = synthetic(root, "val").images
    plot_pca(extractors, test_images[:: max(1, len(test_images) // 6)][:6], out / "pca.png", PROBE_SIZE)

    checks = verdict(rows)
    references = [describe_position(position_depth(EmbeddedTasks.load(root)))]
    if args.bound_steps:
        bound = depth_bound(cfg.model.arch, args.bound_steps, root, device, out / f"depth_bound_{cfg.model.arch}")
        references.append(describe(bound))
    header = (f"# VADeR demo on the embedded data set\n\nresnet18 + FPN, {args.steps} steps, batch {args.batch}, "
              f"{args.view_size} px views, on {device}. Frozen features; linear probes fitted on the training "
              "scenes and scored on the validation scenes (lit differently); propagation through clips whose "
              "lighting changes every frame. The random init row is the network this run started from.")
    lines = [table(rows, header), "", *(line for ref in references for line in (ref, "")), "![loss](loss.png)", "",
             "The loss first rises while the queue's random initial keys are replaced by real ones.", "",
             "![pca](pca.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    better = [c["metric"] for c in checks if c["margin"] > 0]
    print("\n".join([c["line"] for c in checks] + references))
    print(f"trained VADeR beats the strongest random baseline on {', '.join(better) or 'nothing'}. "
          f"Report: {out / 'report.md'}")
    return 0 if better or args.tiny else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, NotOurs) as err:  # a folder that is not ours, a run folder holding another run: one line
        sys.exit(f"error: {err}")
