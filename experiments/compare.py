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

Writes to ``--out``: ``results.json`` (every score of every seed, the time each run's training steps and
evaluation took), ``table.md`` (mean ± std over seeds, the trivial baselines, the verdict against the strongest
random baseline, the costs) and ``compare.png`` (the same numbers as bars with error bars); with ``--curve``,
``curve.md``, ``curve.json`` and ``curve.png`` (each metric's margin against steps).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from densessl.evaluation.embedded import (PROBE_SIZE, PROBES, EmbeddedTasks, flat_scores, position_depth,
                                         score_embedded)
from densessl.evaluation.features import model_extractors, random_model
from densessl.evaluation.report import markdown_table
from densessl.model.builder import ModelConfig, MoCo
from densessl.model.methods import method_config
from densessl.pipeline import DataConfig, PairSpec
from densessl.pipeline.multicrop import MultiCropViews
from densessl.pipeline.owned import NotOurs, claim, json_keys
from densessl.pipeline.synthetic import SyntheticConfig, generate
from densessl.train.config import (ConfigError, OptimConfig, RunConfig, TrainConfig, different_training, parse,
                                   with_overrides)
from densessl.train.distributed import resolve_device
from densessl.train.trainer import run

ARCH = "resnet18"  # every preset's encoder
TINY_DATA = SyntheticConfig(height=96, width=128, train_per_class=4, val_per_class=2, videos=1, frames=4)  # tests
# --tiny (the tests, seconds): these where no flag is given, on TINY_DATA
TINY = {"seeds": [0], "steps": 4, "batch": 8, "view_size": 64, "objectives": ["vader", "mocov2", "vader_multicrop"]}
NAMES = {"vader": "VADeR", "densecl": "DenseCL", "mocov2": "MoCo v2", "vader_multicrop": "VADeR multi-crop"}
# (metric, higher is better, title): what the verdict, the ablations' differences and the plot's panels read
METRICS = (("mIoU", True, "segmentation mIoU ↑"), ("J&F", True, "propagation J&F ↑"),
           ("RMSE", False, "depth RMSE (m) ↓"), ("top-1", True, "shape classification top-1 ↑"))
# The budgets: 'cpu' is the one chosen for a 2-core machine from the margin-against-steps curve (README: at 400
# steps VADeR separates from every random read-out on segmentation and propagation over three seeds, at 200 only
# on propagation; it runs on a GPU where there is one); 'gpu' is the larger one for a GPU machine. Seeds per mode.
PRESETS = {
    "cpu": {"steps": 400, "batch": 32, "view_size": 64, "workers": 2, "device": "auto",
            "objectives": ["vader", "densecl", "mocov2"],  # VADeR multi-crop's step is ~20x slower here: its
            # queue holds 8 batches of its 288 keys per image (RESULTS.md)
            "seeds": {"compare": [0, 1, 2], "ablations": [0, 1], "curve": [0]}},
    "gpu": {"steps": 1600, "batch": 32, "view_size": 96, "workers": max(2, (os.cpu_count() or 4) - 2), "device": "cuda",
            "objectives": list(NAMES), "seeds": {"compare": [0, 1, 2], "ablations": [0, 1, 2], "curve": [0]}},
}
# The reviewers' questions: the objective each row trains and its configuration keys ('init MoCo v2' reads the
# encoder of this comparison's own MoCo v2 run of the same seed: the paper starts VADeR from MoCo v2 weights).
ABLATIONS = {
    "VADeR": ("vader", {}),
    "negatives: same image (r=2)": ("vader", {"method.negatives": "image", "method.exclusion_radius": 2.0}),
    "queue 1,024": ("vader", {"method.queue_size": 1024}),
    "no momentum encoder": ("vader", {"method.momentum": 0.0}),
    "no momentum encoder, in-batch negatives (SimCLR-style)": ("vader", {"method.momentum": 0.0,
                                                                         "method.negatives": "batch"}),
    "Table 3: unmatched positives": ("vader", {"method.positives": "unmatched"}),
    "Table 3: same view": ("vader", {"views.same_window": True}),
    "8 matches per pair": ("vader", {"views.num_matches": 8}),
    "init MoCo v2": ("vader", {"model.init_encoder": "mocov2"}),
    # R2: MoCo v2 for VADeR's extra steps from the same start; R3: instance-level MoCo v2 on VADeR's crops
    "R2: MoCo v2 continued from MoCo v2": ("mocov2", {"model.init_encoder": "mocov2"}),
    "R3: MoCo v2 on VADeR multi-crop's crops": ("mocov2_multicrop", {}),
}


def multicrop_views(view_size: int) -> MultiCropViews:
    """VADeR multi-crop at the comparison's budget: 2 global views of ``view_size`` and 4 local views of about 0.43
    of it (DINO's 96 / 224), a multiple of 32 (the encoder's stride)."""
    local = max(32, round(view_size * 96 / 224 / 32) * 32)
    return MultiCropViews(f"2x{view_size},4x{local}")


def base_config(data: Path, args, method: str = "vader") -> TrainConfig:
    """One run of the comparison (and the demo): resnet18, ``args``' steps, batch, views and device, a queue of 8
    batches of keys, cosine schedule after a short warm-up, DenseCL's dense term from a tenth of the steps.
    ``<method>_multicrop`` is the method on ``multicrop_views``, with the same budget."""
    extra = {"warmup_steps": args.steps // 10} if method == "densecl" else {}
    crops = method.endswith("_multicrop")
    views = multicrop_views(args.view_size) if crops else PairSpec(size=args.view_size)
    method = method.removesuffix("_multicrop")
    keys = 32 if not crops else sum(rule.num_matches for _, _, rule in views.spec.pairs())  # VADeR's, to size the
    # queue alike for every method (a multiple of what any of them enqueues: one key per matched pair, or its matches)
    return TrainConfig(
        data=DataConfig(path=str(data / "train"), workers=args.workers), views=views,
        model=ModelConfig(arch=ARCH), method=method_config(method, queue_size=args.batch * keys * 8, **extra),
        optim=OptimConfig(batch_size=args.batch, steps=args.steps, lr=0.3, decoder_lr=0.3,
                          warmup_steps=min(20, args.steps // 10)),
        run=RunConfig(checkpoint_every=max(1, args.steps // 2), keep_checkpoints=1, resume="auto", device=args.device,
                      progress=False, log_images=0))  # keep 1: a run is read at its newest step only (disk: README)


def pretrain(cfg: TrainConfig) -> dict:
    """Train (or finish, or reuse) one run: the model, and the run's training time and pairs/s read back from
    its metrics.csv (each step's own time), so a resumed or reused run reports what its steps took. A run folder
    that holds a run with other settings is refused, not resumed into; a run that stops early is an error."""
    held = Path(cfg.run.dir) / "config.yaml"
    if held.is_file():
        differ = different_training(parse(["--config", str(held)]), cfg)
        if differ:
            raise ConfigError(f"{cfg.run.dir} holds a run trained with other settings ({', '.join(differ)}): "
                              "give another --out or --runs, or delete that folder")
    result = run(cfg)
    if result.step < result.total:
        raise RuntimeError(f"{cfg.run.dir}: training stopped at step {result.step} of {result.total} (a stop "
                           "request, or a non-finite loss: see its log); run the command again to resume it")
    model, batch = result.model.eval(), cfg.optim.batch_size
    with open(Path(cfg.run.dir) / "metrics.csv", newline="") as f:
        seconds = [batch / max(float(r["images_per_s"]), 1e-3) for r in csv.DictReader(f)]
    final = checkpoint_path(cfg.run.dir, cfg.optim.steps)  # names the trained weights (a retrained run rescores)
    return {"model": model, "wall_s": sum(seconds), "pairs_per_s": len(seconds) * batch / sum(seconds),
            "checkpoint": f"{final.name} ({final.stat().st_mtime_ns})"}


def checkpoint_path(run_dir, steps: int) -> Path:
    """A run's checkpoint after ``steps`` steps (its last one: ``base_config`` checkpoints at the end)."""
    return Path(run_dir) / "checkpoints" / f"step_{steps:08d}.pt"


# scores.json as densessl kept it before each probe had its own version (one protocol number for all):
# each of these probes' metrics, read back as version 1 of that probe; the k-NN classification is scored again
_PROTOCOL_1 = {"segmentation": ("mIoU", "trivial mIoU", "seg probe loss"),
               "depth": ("RMSE", "delta1", "trivial RMSE", "trivial delta1", "depth probe loss"),
               "propagation": ("J&F", "J", "F")}


def _kept_scores(cache: Path, key: str, rescore: bool) -> dict:
    """What ``cache`` keeps for ``key`` ({'scores': {kind: {probe: scores}}, 'versions': {kind: {probe:
    version}}, 'seconds': {kind: s}}), empty when it keeps nothing usable; a file of the one-protocol format is
    read as its probes' version 1, and a probe no longer in ``PROBES`` is dropped."""
    try:
        kept = json.loads(cache.read_text()) if cache.is_file() and not rescore else {}
    except json.JSONDecodeError:  # cut short while written: evaluated again
        kept = {}
    old_key = json.loads(kept.get("key", "{}"))
    if old_key.pop("protocol", None) == 1 and json.dumps(old_key) == key:
        flat = kept["scores"]  # {kind: every metric}; 'probes converged' was the two linear probes'
        kept = {"key": key, "seconds": kept.get("seconds", {}),
                "scores": {kind: {probe: {m: scores[m] for m in metrics} for probe, metrics in _PROTOCOL_1.items()}
                           for kind, scores in flat.items()},
                "versions": {kind: dict.fromkeys(_PROTOCOL_1, 1) for kind in flat}}
        for kind, scores in flat.items():
            kept["scores"][kind]["segmentation"]["seg probe converged"] = scores["probes converged"]
            kept["scores"][kind]["depth"]["depth probe converged"] = scores["probes converged"]
    kept = kept if kept.get("key") == key else {"key": key}
    for part in ("scores", "versions", "seconds"):
        kept.setdefault(part, {})
    for kind in kept["scores"]:
        kept["scores"][kind] = {p: v for p, v in kept["scores"][kind].items() if p in PROBES}
    return kept


def evaluate(model, data: Path, device, kinds, folder: Path, of: str, rescore: bool = False) -> tuple[dict, float]:
    """Every kind of the model's features through every protocol (``evaluation.embedded``): {kind: scores},
    and the seconds spent computing them (a probe scored again adds its own).

    The scores are kept in ``folder/scores.json`` under what they were computed from (``of``: the final
    checkpoint, or the random init's arch and seed; the data set's path and contents; the probe size), each
    probe's with its protocol version (``evaluation.embedded.PROBES``), and read back from there when asked again
    (unless ``rescore``): the comparison, the ablations, the curve and a table built in pieces evaluate each model
    once, and a probe whose protocol changed is run again alone."""
    cache = folder / "scores.json"
    key = json.dumps({"model": of, "data": str(Path(data).resolve()), "probe size": list(PROBE_SIZE),
                      "data set": hashlib.sha256((Path(data) / "meta.json").read_bytes()).hexdigest()[:16]})
    kept = _kept_scores(cache, key, rescore)
    tasks = None
    extractors = model_extractors(model, kinds)  # the kinds this model has (MoCo v2 has no dense output)
    for kind, fn in extractors.items():
        versions = kept["versions"].setdefault(kind, {})
        stale = [p for p, version in PROBES.items() if versions.get(p) != version]
        if not stale:
            print(f"  [{kind}] scores read back from {cache}", flush=True)
        else:
            if len(stale) < len(PROBES):
                print(f"  [{kind}] {', '.join(stale)}: protocol changed, scored again (the rest read back)",
                      flush=True)
            tasks, t0 = tasks or EmbeddedTasks.load(data), time.monotonic()
            kept["scores"].setdefault(kind, {}).update(score_embedded(fn.to(device), tasks, kind, probes=stale))
            versions.update({p: PROBES[p] for p in stale})
            kept["seconds"][kind] = kept["seconds"].get(kind, 0) + time.monotonic() - t0
            folder.mkdir(parents=True, exist_ok=True)
            cache.with_suffix(".tmp").write_text(json.dumps(kept, indent=1))
            os.replace(cache.with_suffix(".tmp"), cache)
        s = flat_scores(kept["scores"][kind])
        print(f"  [{kind}] mIoU {s['mIoU']:.3f}  RMSE {s['RMSE']:.3f}  J&F {s['J&F']:.3f}  top-1 {s['top-1']:.3f}",
              flush=True)
    return ({kind: flat_scores(kept["scores"][kind]) for kind in extractors},
            sum(kept["seconds"].get(kind, 0) for kind in extractors))


def summarise(results: list[dict]) -> dict[str, dict]:
    """Rows ``model [kind]`` with mean and std over seeds of every score, and each model's run costs."""
    rows: dict[str, dict] = {}
    for r in results:
        for kind, scores in r["scores"].items():
            row = rows.setdefault(f"{r['model']} [{kind}]", {"model": r["model"], "kind": kind, "seeds": {},
                                                             "random": r["random"], "wall_s": [],
                                                             "pairs_per_s": []})
            row["seeds"][r["seed"]] = scores
            if not r["random"]:
                row["wall_s"].append(r["wall_s"])
                row["pairs_per_s"].append(r["pairs_per_s"])
    for row in rows.values():
        per_seed = list(row["seeds"].values())
        row["mean"] = {k: float(np.mean([s[k] for s in per_seed])) for k in per_seed[0]}
        row["std"] = {k: float(np.std([s[k] for s in per_seed], ddof=1)) if len(per_seed) > 1 else 0.0
                      for k in per_seed[0]}
    return rows


def verdict(rows: dict[str, dict]) -> list[dict]:
    """Per score, the best trained row against the strongest random baseline (means over seeds): the margin
    is positive when the trained row is better (higher, or lower for RMSE). With seeds on both sides, a margin
    no larger than the larger of their stds is called within spread, not better or worse."""
    out = []
    trained = [n for n, r in rows.items() if not r["random"]]
    baselines = [n for n, r in rows.items() if r["random"]]
    for metric, higher, _ in METRICS:
        if not trained or not baselines:
            continue
        pick = max if higher else min
        best = pick(trained, key=lambda n: rows[n]["mean"][metric])
        base = pick(baselines, key=lambda n: rows[n]["mean"][metric])
        margin = (rows[best]["mean"][metric] - rows[base]["mean"][metric]) * (1 if higher else -1)
        seeded = min(len(rows[best]["seeds"]), len(rows[base]["seeds"])) > 1
        spread = max(rows[best]["std"][metric], rows[base]["std"][metric]) if seeded else 0.0
        word = ("within spread" if seeded and abs(margin) <= spread else "better" if margin > 0 else "not better")
        out.append({"metric": metric, "best": best, "baseline": base, "margin": margin,
                    "values": (rows[best]["mean"][metric], rows[base]["mean"][metric]),
                    "line": f"- {metric}: best trained {best} {rows[best]['mean'][metric]:.3f} vs strongest random "
                            f"baseline {base} {rows[base]['mean'][metric]:.3f}: {margin:+.3f} "
                            + (f"± {spread:.3f} " if seeded else "") + f"({word})"})
    return out


def table(rows: dict[str, dict], header: str) -> str:
    def fmt(r, k):  # one seed has no spread to show
        return f"{r['mean'][k]:.3f}" + (f" ± {r['std'][k]:.3f}" if len(r["seeds"]) > 1 else "")

    cols = ["seeds", "seg mIoU", "(trivial)", "depth RMSE (m)", "(trivial)", "depth δ1", "J&F", "J", "F",
            "shape top-1", "(trivial)", "probes converged", "train steps (s)", "pairs/s"]
    cells = {}
    for name, r in rows.items():
        cost = (["-", "-"] if r["random"] else
                [f"{np.mean(r['wall_s']):.0f}", f"{np.mean(r['pairs_per_s']):.1f}"])
        cells[name] = [str(len(r["seeds"])), fmt(r, "mIoU"), f"{r['mean']['trivial mIoU']:.3f}", fmt(r, "RMSE"),
                       f"{r['mean']['trivial RMSE']:.3f}", fmt(r, "delta1"), fmt(r, "J&F"), fmt(r, "J"), fmt(r, "F"),
                       fmt(r, "top-1"), f"{r['mean']['trivial top-1']:.3f}", f"{r['mean']['probes converged']:.0%}",
                       *cost]
    lines = [header, "", markdown_table(cols, cells, "model [features]")]
    beaten = [f"{n} seed {seed} ({m})" for n, r in rows.items() for seed, scores in r["seeds"].items()
              for m, t, higher in (("mIoU", "trivial mIoU", True), ("RMSE", "trivial RMSE", False),
                                   ("top-1", "trivial top-1", True))
              if (scores[m] <= scores[t]) == higher]
    lines += ["", "Every probe beats its trivial baseline in every seed (majority class; training-mean depth; "
              "commonest label)." if not beaten else
              f"Probes NOT beating their trivial baseline: {', '.join(beaten)}.", "",
              "Verdict (means over seeds):", *(v["line"] for v in verdict(rows))]
    return "\n".join(lines)


def against(rows: dict[str, dict], reference: str) -> str:
    """Each trained model's best read-out against ``reference``'s best, per metric (as ``verdict`` reads them):
    the difference of means (positive: better than the reference) and the larger of the two spreads. A difference
    no larger than its spread is marked 'within spread', and is no answer either way."""

    def best(model, metric, higher):
        found = [r for r in rows.values() if r["model"] == model]
        return (max if higher else min)(found, key=lambda r: r["mean"][metric])

    cells = {}
    for model in dict.fromkeys(r["model"] for r in rows.values() if not r["random"] and r["model"] != reference):
        cells[model] = []
        for metric, higher, _ in METRICS:
            a, b = best(model, metric, higher), best(reference, metric, higher)
            diff = (a["mean"][metric] - b["mean"][metric]) * (1 if higher else -1)
            if min(len(a["seeds"]), len(b["seeds"])) < 2:
                cells[model].append(f"{diff:+.3f} (1 seed: no spread)")
                continue
            spread = max(a["std"][metric], b["std"][metric])
            cells[model].append(f"{diff:+.3f} ± {spread:.3f}" + ("" if abs(diff) > spread else " (within spread)"))
    return "\n".join([f"Against {reference} (each model's best read-out; positive: better; ± the larger std):", "",
                      markdown_table([m for m, *_ in METRICS], cells, "model")])


def plot(rows: dict[str, dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 0.45 * len(names) + 1.5), sharey=True)
    models = list(dict.fromkeys(r["model"] for r in rows.values() if not r["random"]))
    palette = [plt.cm.tab20(i) for i in (*range(0, 20, 2), *range(1, 20, 2)) if i not in (14, 15)]  # no greys
    colours = ["0.6" if rows[n]["random"] else palette[models.index(rows[n]["model"]) % len(palette)] for n in names]
    for ax, (metric, _, title) in zip(axes, METRICS):
        means = [rows[n]["mean"][metric] for n in names]
        stds = [rows[n]["std"][metric] for n in names]
        ax.barh(range(len(names)), means, xerr=stds, color=colours, capsize=3)
        ax.set(title=title, yticks=range(len(names)), yticklabels=names)
        ax.invert_yaxis()
    fig.suptitle("mean ± std over pretraining seeds (grey: random init)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
    if args.data:
        p.error("--data is now --synthetic-dir: the folder the embedded set is written to (not a data set of yours)")
    out = claim(args.out, "comparison", "--out",  # before markers: its results.json (a comparison's, the ablations')
                legacy=lambda folder: json_keys(folder / "results.json", "runs", "rows"))
    runs = Path(args.runs) if args.runs else out / "runs"

    # --- data: the embedded set (tiny: a few scenes and one short clip)
    data = generate(args.synthetic_dir, TINY_DATA if args.tiny else SyntheticConfig(), progress=not args.tiny,
                    option="--synthetic-dir")
    randoms = score_random(args, data, runs)
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
    header = (f"# Comparison of {what} on the embedded set\n\n{ARCH}, {args.steps} steps, batch {args.batch}, "
              f"{args.view_size} px views, seeds {args.seeds}, device {resolve_device(args.device)}; probes at "
              f"{PROBE_SIZE[0]}x{PROBE_SIZE[1]}, mean ± std over seeds.")

    def report(results: list[dict], final: bool = False) -> str:
        rows = summarise(results + randoms)
        text = "\n\n".join([
            table(rows, header), *([against(rows, "VADeR")] if args.ablations else []),
            f"Depth from position alone (the probe sees each pixel's row and column, nothing of the image): "
            f"RMSE {where['RMSE']:.3f}, δ1 {where['delta1']:.3f}.",
            costs(results + randoms, time.monotonic() - started)
            + ("" if final else f" Partial: {len(results)} of {expected} runs so far.")])
        (out / "results.json").write_text(json.dumps({"runs": results + randoms, "rows": rows,
                                                      "position depth": where}, indent=1, default=str))
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

def budget(args) -> str:
    """The folder name of one pretraining budget: runs of different budgets never resume into each other."""
    return f"{ARCH}_{args.steps}steps_batch{args.batch}_{args.view_size}px"


def random_baseline(arch: str, seed: int, data: Path, device, kinds, folder: Path,
                    rescore: bool = False) -> tuple[MoCo, dict]:
    """Random init of ``seed`` (the network a run of that seed starts from) on ``device``, and its result,
    evaluated in (or read back from) ``folder``."""
    model = random_model(arch, seed).to(device)
    scores, eval_s = evaluate(model, data, device, kinds, folder, f"random {arch} seed {seed}", rescore)
    return model, {"model": "random init", "objective": None, "seed": seed, "random": True, "run": str(folder),
                   "eval_s": eval_s, "scores": scores}


def score_random(args, data: Path, runs: Path) -> list[dict]:
    """The random baselines, one per seed, scored once for every budget: they live beside the budgets'
    folders."""
    results = []
    for seed in args.seeds:
        print(f"== random init, seed {seed}: evaluating", flush=True)
        results.append(random_baseline(ARCH, seed, data, resolve_device(args.device), args.kinds,
                                       runs / f"random_init_{ARCH}_seed{seed}", args.rescore)[1])
    return results


def train_and_score(plans, args, data: Path, runs: Path, on_result=None) -> list[dict]:
    """Pretrain (or reuse) and evaluate (or read back) each planned run, calling ``on_result`` with the results
    so far after each one."""
    def run_dir(label: str, seed: int) -> Path:
        return runs / budget(args) / f"{''.join(c if c.isalnum() else '_' for c in label).lower()}_seed{seed}"

    results = []
    for label, key, seed, cfg in plans:
        cfg = with_overrides(cfg, {"run.seed": seed, "run.dir": str(run_dir(label, seed))})
        if cfg.model.init_encoder == "mocov2":
            cfg = with_overrides(cfg, {"model.init_encoder": str(checkpoint_path(run_dir("MoCo v2", seed),
                                                                                 args.steps))})
        print(f"== {label}, seed {seed}: pretraining {cfg.optim.steps} steps -> {cfg.run.dir}", flush=True)
        trained = pretrain(cfg)
        model = trained.pop("model")
        if args.ablations and label == "MoCo v2":  # the runs 'init MoCo v2' start from (make compare reports it)
            continue
        print(f"== {label}, seed {seed}: evaluating ({trained['pairs_per_s']:.1f} pairs/s in pretraining)",
              flush=True)
        device = next(model.parameters()).device
        scores, eval_s = evaluate(model, data, device, args.kinds, Path(cfg.run.dir), trained["checkpoint"],
                                  args.rescore)
        results.append({"model": label, "objective": key, "seed": seed, "random": False, "run": cfg.run.dir,
                        **trained, "eval_s": eval_s, "scores": scores})
        if on_result:
            on_result(results)
    return results


def costs(results: list[dict], command_s: float) -> str:
    """What the table cost, measured: the training steps and evaluations of every run in it (whenever they ran:
    a table built in resumable pieces sums its pieces) and this command's own wall time."""
    unique = {r["run"]: r for r in results}.values()  # each run once, however many results name it
    train = sum(r.get("wall_s", 0) for r in unique)
    evals = sum(r["eval_s"] for r in unique)
    return (f"Cost: {len(unique)} runs (trained or random, per seed); training steps {train / 60:.1f} min, "
            f"evaluations {evals / 60:.1f} min (summed over the runs, whichever command ran them); this command "
            f"took {command_s / 60:.1f} min.")

if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, NotOurs) as err:  # a folder that is not ours, a run folder holding another run: one line
        sys.exit(f"error: {err}")
