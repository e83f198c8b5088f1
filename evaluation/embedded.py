"""The embedded set's protocols for one feature extractor in one call: segmentation and depth probes, mask
propagation and a classification probe on pooled features, with each probe's trivial baseline and state.
``python -m densessl.evaluation all``, ``make compare`` and ``make demo`` all report these scores."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import datasets
from .classify import shape_probe
from .probe import linear_probe, warn_if_unreliable
from .propagation import evaluate_videos

PROBE_SIZE = (128, 160)  # probe input (H, W): the embedded set's frame size
# Each probe's protocol version, raised whenever that probe's protocol or outputs change: the scores it gave
# before are stale and computed again, the other probes' are kept (``experiments.scores.evaluate``).
# classification 2: a linear probe on features pooled over the largest shape (1: a k-NN vote on globally pooled
# features, at chance for every model).
PROBES = {"segmentation": 1, "depth": 1, "propagation": 1, "classification": 2}


@dataclass(frozen=True)
class EmbeddedTasks:
    """The embedded set's (train, val) segmentation and depth sets and its validation clips, read once."""

    segmentation: tuple
    depth: tuple
    videos: list

    @classmethod
    def load(cls, root: str | Path) -> EmbeddedTasks:
        return cls(tuple(datasets.synthetic(root, s) for s in ("train", "val")),
                   tuple(datasets.synthetic(root, s, "depth") for s in ("train", "val")),
                   datasets.synthetic_videos(root))


def score_embedded(features_fn, tasks: EmbeddedTasks, label: str, size=PROBE_SIZE, steps: int = 300,
                   probes=tuple(PROBES)) -> dict[str, dict]:
    """One extractor through the asked ``probes`` (``PROBES``' names), each probe's scores under its name:
    segmentation mIoU, depth RMSE and delta1, propagation J&F, J and F, classification top-1 (``classify``);
    with each fitted probe's trivial baseline, final loss and whether it converged (1.0 or 0.0). Warns, naming
    ``label``, when a probe had not converged or loses to its trivial baseline. The scenes' features are
    extracted once for the three probes that read them (segmentation and depth label the same images).
    ``flat_scores`` makes one row of the result."""
    unknown = set(probes) - set(PROBES)
    if unknown:
        raise ValueError(f"unknown probes {sorted(unknown)}: choose from {', '.join(PROBES)}")
    cache, out = {}, {}
    if "segmentation" in probes:
        s = linear_probe(features_fn, *tasks.segmentation, size, steps, cache=cache)
        warn_if_unreliable(s, "mIoU", f"{label} segmentation")
        out["segmentation"] = {"mIoU": s["mIoU"], "trivial mIoU": s["trivial"]["mIoU"],
                               "seg probe loss": s["probe loss"], "seg probe converged": float(s["probe converged"])}
    if "classification" in probes:
        c = shape_probe(features_fn, *tasks.segmentation, size, steps, cache=cache)
        warn_if_unreliable(c, "top-1", f"{label} classification")
        out["classification"] = {"top-1": c["top-1"], "trivial top-1": c["trivial"]["top-1"],
                                 "classification probe loss": c["probe loss"],
                                 "classification probe converged": float(c["probe converged"])}
    if "depth" in probes:
        d = linear_probe(features_fn, *tasks.depth, size, steps, cache=cache)
        warn_if_unreliable(d, "RMSE", f"{label} depth")
        out["depth"] = {"RMSE": d["RMSE"], "delta1": d["delta1"], "trivial RMSE": d["trivial"]["RMSE"],
                        "trivial delta1": d["trivial"]["delta1"], "depth probe loss": d["probe loss"],
                        "depth probe converged": float(d["probe converged"])}
    del cache  # the scenes' features are freed before propagation reads the clips
    if "propagation" in probes:
        v = evaluate_videos(features_fn, tasks.videos)
        out["propagation"] = {"J&F": v["J&F"], "J": v["J"], "F": v["F"]}
    return out


def flat_scores(by_probe: dict[str, dict]) -> dict:
    """One row from ``score_embedded``'s scores: every probe's metrics, and ``probes converged``: 1.0 when every
    fitted probe among them converged."""
    row = {k: v for scores in by_probe.values() for k, v in scores.items()}
    row["probes converged"] = float(all(v for k, v in row.items() if k.endswith("probe converged")))
    return row


def position_depth(tasks: EmbeddedTasks, size=PROBE_SIZE) -> dict:
    """The depth probe fitted on where each pixel is and nothing it shows: features are the row and column
    coordinates (and their squares) on a stride-4 grid. The embedded set's floor recedes with the row, so this
    probe gets the background roughly right and every shape wrong: features beat it by finding the shapes and
    reading their depth from their size, texture and base (``pipeline.synthetic``), which is what the supervised
    bound (``depth_bound``) shows the pixels allow. Returns ``linear_probe``'s depth result."""
    def where(x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        rows, cols = torch.meshgrid(torch.linspace(0, 1, h // 4), torch.linspace(0, 1, w // 4), indexing="ij")
        return torch.stack([rows, cols, rows ** 2, cols ** 2])[None].expand(n, -1, -1, -1)

    return linear_probe(where, *tasks.depth, size)


def describe_position(where: dict) -> str:
    """One line for a report: what ``position_depth`` is and what it scores."""
    return (f"Depth from position alone (the probe sees each pixel's row and column, nothing of the image): "
            f"RMSE {where['RMSE']:.3f}, δ1 {where['delta1']:.3f}.")
