"""`make demo`: pretrain VADeR on the embedded set on CPU, then show the learned features beat random init.

Generates the synthetic set, trains resnet18 + FPN (a few minutes on 2 cores; resumes if interrupted), fits a
linear segmentation probe on frozen features of labelled scenes for the trained and a randomly initialised
network, and writes ``report.md`` with a loss curve and PCA-of-features images to the output folder.
Exits with status 1 if the learned features do not beat random init.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import matplotlib.pyplot as plt
from evaluation.datasets import synthetic
from evaluation.features import checkpoint_extractor, feature_extractor
from evaluation.probe import linear_probe
from evaluation.visualize import plot_pca
from pipeline.synthetic import CLASSES, SyntheticConfig, generate

from .config import TrainConfig
from .trainer import run

PROBE_SIZE = (128, 160)


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
    p.add_argument("--data", default="data/synthetic")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--view-size", type=int, default=96)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--probe-epochs", type=int, default=60)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="where training and the probes run (auto: the GPU when there is one)")
    p.add_argument("--tiny", action="store_true", help="a seconds-long run on a tiny data set (tests)")
    args = p.parse_args(argv)
    out = Path(args.out)

    data_cfg = SyntheticConfig()
    if args.tiny:
        data_cfg = SyntheticConfig(height=96, width=128, train_per_class=4, val_per_class=2, videos=0)
    root = generate(args.data, data_cfg)
    cfg = TrainConfig(data=str(root / "train"), arch="resnet18", view_size=args.view_size, batch_size=args.batch,
                      workers=args.workers, steps=args.steps, queue_size=args.batch * 32 * 8, lr=0.3,
                      decoder_lr=0.3, warmup_steps=min(20, args.steps // 10), run_dir=str(out),
                      checkpoint_every=50, resume="auto", device=args.device)
    model = run(cfg).model.eval()
    device = next(model.parameters()).device  # where training ran: the probes' features are computed there too
    extractors = {"VADeR (trained)": checkpoint_extractor(model, "VADeR (trained)")[1],
                  "random init": feature_extractor(f"random:{cfg.arch}", device=device)[1]}
    train_set, test_set = synthetic(root, "train"), synthetic(root, "val")
    results = {name: linear_probe(fn, train_set, test_set, PROBE_SIZE, epochs=args.probe_epochs)
               for name, fn in extractors.items()}
    plot_loss(out / "metrics.csv", out / "loss.png")
    plot_pca(extractors, test_set.images[:: max(1, len(test_set.images) // 6)][:6], out / "pca.png", PROBE_SIZE)

    classes = ["background", *CLASSES]
    learned, random_miou = results["VADeR (trained)"]["mIoU"], results["random init"]["mIoU"]
    lines = ["# VADeR demo on the embedded data set", "",
             f"resnet18 + FPN, {args.steps} steps, batch {args.batch}, {args.view_size}px views, CPU.",
             "Linear probe (1x1 conv on frozen 1/4-scale features), trained on the train scenes, "
             "evaluated on held-out val scenes.", "",
             "| features | mIoU | " + " | ".join(classes) + " |", "|---" * (len(classes) + 2) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['mIoU']:.3f} | " + " | ".join(f"{float(v):.3f}" for v in r["IoU"]) + " |")
    verdict = "beat" if learned > random_miou else "did NOT beat"
    lines += ["", f"Learned features {verdict} random init ({learned:.3f} vs {random_miou:.3f} mIoU).", "",
              "![loss](loss.png)", "",
             "The loss first rises while the queue's random initial keys are replaced by real ones.", "",
             "![pca](pca.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    print(f"segmentation probe mIoU: learned {learned:.3f}, random init {random_miou:.3f} -> learned features "
          f"{verdict} random init. Report: {out / 'report.md'}")
    return 0 if learned > random_miou or args.tiny else 1


if __name__ == "__main__":
    sys.exit(main())
