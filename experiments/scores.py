"""The comparison's runs and their scores: pretrain (or reuse) a run, evaluate a model (or read its scores back
from the cache kept beside it, ``scores.json``), the random baselines, and the loop over planned runs."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from pathlib import Path

from densessl.evaluation.depth_bound import depth_upper_bound
from densessl.evaluation.embedded import PROBE_SIZE, PROBES, EmbeddedTasks, flat_scores, score_embedded
from densessl.evaluation.features import model_extractors, random_model
from densessl.model.builder import MoCo
from densessl.train.config import ConfigError, TrainConfig, different_training, parse, with_overrides
from densessl.train.distributed import resolve_device
from densessl.train.trainer import run

from .presets import ARCH, RANDOM_NAMES, arch_of, budget

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


def _data_key(data: Path) -> dict:
    """What a score depends on besides the model: the data set's path and contents, and the probe size."""
    return {"data": str(Path(data).resolve()), "probe size": list(PROBE_SIZE),
            "data set": hashlib.sha256((Path(data) / "meta.json").read_bytes()).hexdigest()[:16]}


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
    key = json.dumps({"model": of, **_data_key(data)})
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


def random_baseline(arch: str, seed: int, data: Path, device, kinds, folder: Path,
                    rescore: bool = False) -> tuple[MoCo, dict]:
    """Random init of ``seed`` (the network a run of that seed starts from) on ``device``, and its result,
    evaluated in (or read back from) ``folder``."""
    model = random_model(arch, seed).to(device)
    scores, eval_s = evaluate(model, data, device, kinds, folder, f"random {arch} seed {seed}", rescore)
    return model, {"model": RANDOM_NAMES.get(arch, f"random init {arch}"), "objective": None, "arch": arch,
                   "seed": seed, "random": True, "run": str(folder), "eval_s": eval_s, "scores": scores}


def depth_bound(arch: str, steps: int, data: Path, device, folder: Path, rescore: bool = False) -> dict:
    """``arch``'s supervised depth upper bound (``evaluation.depth_bound``) on the embedded set, kept in
    ``folder/bound.json`` under what it was computed from and read back from there when asked again (unless
    ``rescore``): computed once for the comparison, the ablations and the tables built in pieces."""
    cache = folder / "bound.json"
    key = json.dumps({"bound": arch, "steps": steps, "version": PROBES["depth"], **_data_key(data)})
    if cache.is_file() and not rescore:
        kept = json.loads(cache.read_text())
        if kept.get("key") == key:
            print(f"== depth upper bound, {arch}: read back from {cache}", flush=True)
            return kept["bound"]
    print(f"== depth upper bound, {arch}: training for depth, {steps} steps", flush=True)
    result = depth_upper_bound(arch, EmbeddedTasks.load(data).depth, PROBE_SIZE, steps, device)
    bound = {k: v for k, v in result.items() if k != "trivial"}
    folder.mkdir(parents=True, exist_ok=True)
    cache.with_suffix(".tmp").write_text(json.dumps({"key": key, "bound": bound}, indent=1))
    os.replace(cache.with_suffix(".tmp"), cache)
    return bound


def score_random(args, data: Path, runs: Path, objectives=()) -> list[dict]:
    """The random baselines, one per seed and encoder (that of each of ``objectives``; none given: ``ARCH``'s),
    scored once for every budget: they live beside the budgets' folders."""
    results = []
    for arch in dict.fromkeys(map(arch_of, objectives)) or [ARCH]:
        for seed in args.seeds:
            print(f"== {RANDOM_NAMES.get(arch, arch)}, seed {seed}: evaluating", flush=True)
            results.append(random_baseline(arch, seed, data, resolve_device(args.device), args.kinds,
                                           runs / f"random_init_{arch}_seed{seed}", args.rescore)[1])
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
        results.append({"model": label, "objective": key, "arch": cfg.model.arch, "seed": seed, "random": False,
                        "run": cfg.run.dir,
                        **trained, "eval_s": eval_s, "scores": scores})
        if on_result:
            on_result(results)
    return results
