"""The comparison's tables and plots: rows of means and spreads over seeds, the verdict against the strongest
random baseline, differences against a reference model, the bars, and what a table cost."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from densessl.evaluation.report import markdown_table

from .presets import ARCH, METRICS

def summarise(results: list[dict]) -> dict[str, dict]:
    """Rows ``model [kind]`` with mean and std over seeds of every score, and each model's run costs."""
    rows: dict[str, dict] = {}
    for r in results:
        for kind, scores in r["scores"].items():
            row = rows.setdefault(f"{r['model']} [{kind}]", {"model": r["model"], "kind": kind, "seeds": {},
                                                             "random": r["random"], "arch": r.get("arch", ARCH),
                                                             "wall_s": [], "pairs_per_s": []})
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
    """Per encoder and score, the best trained row against the strongest random baseline of the same encoder
    (means over seeds): the margin is positive when the trained row is better (higher, or lower for RMSE). With
    seeds on both sides, a margin no larger than the larger of their stds is called within spread, not better or
    worse. With more than one encoder, each line starts with its encoder's name."""
    archs = list(dict.fromkeys(r.get("arch", ARCH) for r in rows.values()))
    return [v for arch in archs for v in _verdict({n: r for n, r in rows.items() if r.get("arch", ARCH) == arch},
                                                  f"{arch}: " if len(archs) > 1 else "")]


def _verdict(rows: dict[str, dict], prefix: str) -> list[dict]:
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
                    "line": f"- {prefix}{metric}: best trained {best} {rows[best]['mean'][metric]:.3f} vs strongest "
                            f"random baseline {base} {rows[base]['mean'][metric]:.3f}: {margin:+.3f} "
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


def against_random(rows: dict[str, dict]) -> list[str]:
    """Per encoder, ``against`` with that encoder's random network as the reference: for every trained model and
    score, whether it beats random init (its strongest read-out) beyond the spread, not only the best model."""
    out = []
    for arch in dict.fromkeys(r.get("arch", ARCH) for r in rows.values()):
        mine = {n: r for n, r in rows.items() if r.get("arch", ARCH) == arch}
        reference = next((r["model"] for r in mine.values() if r["random"]), None)
        if reference and any(not r["random"] for r in mine.values()):
            out.append(against(mine, reference))
    return out


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


def costs(results: list[dict], command_s: float) -> str:
    """What the table cost, measured: the training steps and evaluations of every run in it (whenever they ran:
    a table built in resumable pieces sums its pieces) and this command's own wall time."""
    unique = {r["run"]: r for r in results}.values()  # each run once, however many results name it
    train = sum(r.get("wall_s", 0) for r in unique)
    evals = sum(r["eval_s"] for r in unique)
    return (f"Cost: {len(unique)} runs (trained or random, per seed); training steps {train / 60:.1f} min, "
            f"evaluations {evals / 60:.1f} min (summed over the runs, whichever command ran them); this command "
            f"took {command_s / 60:.1f} min.")
