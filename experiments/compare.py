"""`make compare`: VADeR vs DenseCL vs MoCo v2 vs random init on the embedded set, on equal footing.

    python -m densessl.experiments.compare --out runs/compare     # 3 objectives x 3 seeds, then every evaluation
    python -m densessl.experiments.compare --ablations --out runs/ablations --runs runs/compare/runs  # 2 seeds
    python -m densessl.experiments.compare --curve 200 400 800 1600 --out runs/curve --runs runs/compare/runs
    python -m densessl.experiments.compare --preset gpu ...       # the larger budget, VADeR multi-crop too
    python -m densessl.experiments.compare --tiny                 # seconds: 3 models, 1 seed (the test)

Every model is pretrained with the same budget (``PRESETS``: steps, batch, view size, seeds), and every model
is read the same ways (``evaluation.features.KINDS``: its encoder's hypercolumn for all, its own dense output
where it has one), then scored by the same protocols: a segmentation probe on lighting-shifted scenes, a depth
probe, label propagation through clips whose lighting changes every frame, and a linear classifier on
features pooled over each scene's largest shape.
Random initialisations with the same seeds are the baselines, read the same ways.

Nothing is done twice: runs live in ``RUNS/<budget>/<model>_seed<s>`` and resume where they stopped (a finished
run is not retrained), and each model's scores are kept beside it (``scores.json``), so the comparison, the
ablations and the curve share runs and a table can be built in pieces, across commands.

The pieces: ``presets`` (budgets, ablations, the base configuration), ``scores`` (runs and the score cache),
``tables`` (tables, verdicts, plots); this module runs them.

Writes to ``--out``: ``results.json`` (every score of every seed, the time each run's training steps and
evaluation took), ``table.md`` (mean ± std over seeds, the trivial baselines, the verdict against the strongest
random baseline, the costs) and ``compare.png`` (the same numbers as bars with error bars); with ``--curve``,
``curve.md``, ``curve.json`` and ``curve.png`` (each metric's margin against steps).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from densessl.evaluation.depth_bound import describe
from densessl.evaluation.embedded import PROBE_SIZE, EmbeddedTasks, describe_position, position_depth
from densessl.evaluation.report import markdown_table
from densessl.pipeline.owned import NotOurs, claim, json_keys
from densessl.pipeline.synthetic import SyntheticConfig, generate
from densessl.train.config import ConfigError, with_overrides
from densessl.train.distributed import resolve_device

from .presets import ABLATIONS, ARCH, NAMES, PRESETS, TINY, TINY_DATA, arch_of, base_config
from .scores import depth_bound, score_random, train_and_score
from .tables import against, against_random, costs, plot, summarise, table, verdict


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--synthetic-dir", default="data/synthetic",
                   help="the folder the embedded data set is written to (new, empty, or written by densessl "
                        "before); never a data set of yours: it is replaced when its settings differ")
    p.add_argument("--data", help=argparse.SUPPRESS)  # the old name of --synthetic-dir, refused
    p.add_argument("--objectives", nargs="+", choices=list(NAMES), help="default: the preset's")
    p.add_argument("--preset", choices=list(PRESETS), default="cpu",
                   help="the objectives, steps, view size, workers, device and seeds below as a set (cpu: "
                        "make compare's budget for a 2-core machine; gpu: the larger GPU one); a flag given wins")
    p.add_argument("--seeds", type=int, nargs="+", help="default: the preset's for the mode")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--view-size", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--kinds", nargs="+", default=["hypercolumn", "dense"])
    p.add_argument("--depth-bound-steps", dest="bound_steps", type=int,
                   help="steps the supervised depth upper bound trains each encoder for depth (default: the "
                        "preset's; 0: none)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--ablations", action="store_true", help="VADeR's ablations (ABLATIONS) instead of objectives")
    mode.add_argument("--curve", type=int, nargs="+", metavar="STEPS",
                      help="VADeR's margin over random init against pretraining steps, one full run per count")
    p.add_argument("--runs", help="where the pretraining runs live (default OUT/runs); a finished run found there "
                                  "is reused, so ablations can share the comparison's VADeR and MoCo v2 runs")
    p.add_argument("--rescore", action="store_true", help="evaluate every model again instead of reading back "
                                                           "the scores kept in its run folder")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="seconds: tiny data, 1 seed, 4 steps, batch 8 (the tests)")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    mode = "ablations" if args.ablations else "curve" if args.curve else "compare"
    for key, value in {**preset, "seeds": preset["seeds"][mode],
                       **(TINY if args.tiny else {})}.items():  # what no flag gave: tiny's, else the preset's
        if getattr(args, key) is None:
            setattr(args, key, value)
    started = time.monotonic()
    if args.bound_steps < 0:
        p.error(f"--depth-bound-steps {args.bound_steps}: give 0 (no bound) or more")
    if args.data:
        p.error("--data is now --synthetic-dir: the folder the embedded set is written to (not a data set of yours)")
    out = claim(args.out, "comparison", "--out",  # before markers: its results.json (a comparison's, the ablations')
                legacy=lambda folder: json_keys(folder / "results.json", "runs", "rows"))
    runs = Path(args.runs) if args.runs else out / "runs"

    # --- data: the embedded set (tiny: a few scenes and one short clip)
    data = generate(args.synthetic_dir, TINY_DATA if args.tiny else SyntheticConfig(), progress=not args.tiny,
                    option="--synthetic-dir")
    randoms = score_random(args, data, runs, () if args.ablations or args.curve else args.objectives)
    if args.curve:
        return curve(args, data, runs, out, randoms, started)

    # --- what to train: objectives, or VADeR under each ablation (MoCo v2 runs first where one is read)
    plans = []
    if args.ablations:
        for seed in args.seeds:
            plans.append(("MoCo v2", "mocov2", seed, base_config(data, args, "mocov2")))  # read by init
            for label, (objective, overrides) in ABLATIONS.items():
                plans.append((label, objective, seed, with_overrides(base_config(data, args, objective), overrides)))
    else:
        plans = [(NAMES[o], o, seed, base_config(data, args, o)) for seed in args.seeds for o in args.objectives]

    # --- train and score each, rewriting the report after each one (a long table shows what it has so far)
    expected = sum(1 for label, *_ in plans if not (args.ablations and label == "MoCo v2"))  # the table's runs
    where = position_depth(EmbeddedTasks.load(data))
    what = "ablations of VADeR" if args.ablations else "objectives"
    archs = dict.fromkeys(arch_of(key) for _, key, *_ in plans)
    bounds = [depth_bound(arch, args.bound_steps, data, resolve_device(args.device), runs / f"depth_bound_{arch}",
                          args.rescore) for arch in archs] if args.bound_steps else []
    header = (f"# Comparison of {what} on the embedded set\n\n{', '.join(archs)}, {args.steps} steps, "
              f"batch {args.batch}, {args.view_size} px views, seeds {args.seeds}, device "
              f"{resolve_device(args.device)}; probes at {PROBE_SIZE[0]}x{PROBE_SIZE[1]}, mean ± std over seeds.")

    def report(results: list[dict], final: bool = False) -> str:
        rows = summarise(results + randoms)
        text = "\n\n".join([
            table(rows, header), *([against(rows, "VADeR")] if args.ablations else against_random(rows)),
            describe_position(where) + "".join(f"\n\n{describe(b)}" for b in bounds),
            costs(results + randoms, time.monotonic() - started)
            + ("" if final else f" Partial: {len(results)} of {expected} runs so far.")])
        (out / "results.json").write_text(json.dumps({"runs": results + randoms, "rows": rows,
                                                      "position depth": where, "depth bounds": bounds},
                                                     indent=1, default=str))
        (out / "table.md").write_text(text + "\n")
        plot(rows, out / "compare.png")
        return text

    results = train_and_score(plans, args, data, runs, on_result=report)
    print(report(results, final=True))
    print(f"written to {out}/table.md, results.json and compare.png")
    return 0


def curve(args, data: Path, runs: Path, out: Path, randoms: list[dict], started: float) -> int:
    """``--curve N ...``: VADeR trained for N steps (each its own full schedule, ``args.seeds``), evaluated as the
    comparison does: per step count and metric, the best trained read-out against the strongest random one.
    Writes ``curve.md``, ``curve.json`` and ``curve.png`` (margin against steps)."""
    import matplotlib.pyplot as plt

    points, results = [], []
    for steps in sorted(args.curve):
        at = argparse.Namespace(**{**vars(args), "steps": steps})
        found = train_and_score([("VADeR", "vader", seed, base_config(data, at, "vader")) for seed in args.seeds],
                                at, data, runs)
        results += found
        points.append({"steps": steps, "train_s": float(np.mean([r["wall_s"] for r in found])),
                       "verdict": verdict(summarise(found + randoms))})
    metrics = [v["metric"] for v in points[0]["verdict"]]

    def cell(v):  # "+0.062 (0.394 [hypercolumn] vs 0.332 [hypercolumn])"
        kinds = [name[name.index("["):] for name in (v["best"], v["baseline"])]
        return f"{v['margin']:+.3f} ({v['values'][0]:.3f} {kinds[0]} vs {v['values'][1]:.3f} {kinds[1]})"

    cells = {f"{p['steps']}": [f"{p['train_s']:.0f}"] + [cell(v) for v in p["verdict"]] for p in points}
    text = "\n".join([
        "# VADeR's margin over the strongest random baseline against pretraining steps\n",
        f"{ARCH}, batch {args.batch}, {args.view_size} px views, seeds {args.seeds}, "
        f"device {resolve_device(args.device)}; the margin is the best trained read-out minus the strongest random "
        "one (positive: better; RMSE: lower is better).\n",
        markdown_table(["training steps (s)", *(f"{m} margin" for m in metrics)], cells, "steps"), "",
        costs(results + randoms, time.monotonic() - started)])
    (out / "curve.json").write_text(json.dumps(points, indent=1))
    (out / "curve.md").write_text(text + "\n")
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.2))
    for ax, (i, metric) in zip(axes, enumerate(metrics)):
        ax.plot([p["steps"] for p in points], [p["verdict"][i]["margin"] for p in points], "o-")
        ax.axhline(0, color="0.6", lw=1)
        ax.set(title=f"{metric}: margin over random", xlabel="pretraining steps", xscale="log")
        ax.set_xticks([p["steps"] for p in points], [str(p["steps"]) for p in points])
        ax.minorticks_off()  # the log axis's own labels would crowd the step counts
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=100)
    plt.close(fig)
    print(text)
    print(f"written to {out}/curve.md, curve.json and curve.png")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, NotOurs) as err:  # a folder that is not ours, a run folder holding another run: one line
        sys.exit(f"error: {err}")
