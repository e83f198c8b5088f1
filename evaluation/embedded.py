"""The embedded set's protocols for one feature extractor in one call: segmentation and depth probes, mask
propagation and a pooled-feature classification (k-NN), with each probe's trivial baseline and state.
``python -m densessl.evaluation all``, ``make compare`` and ``make demo`` all report these scores."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import datasets
from .classify import knn_probe
from .probe import linear_probe, warn_if_unreliable
from .propagation import evaluate_videos

PROBE_SIZE = (128, 160)  # probe input (H, W): the embedded set's frame size
PROTOCOL = 1  # raised whenever score_embedded's protocols or outputs change: scores kept from before are stale


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


def score_embedded(features_fn, tasks: EmbeddedTasks, label: str, size=PROBE_SIZE, steps: int = 300) -> dict:
    """One extractor through the protocols: mIoU, RMSE, delta1, J&F, J, F, top-1 (``classify``), the trivial
    probes' mIoU, RMSE, delta1 and top-1, both linear probes' final losses and whether both converged (1.0 or
    0.0). Warns, naming ``label``, when a probe had not converged or loses to its trivial baseline. The scenes'
    features are extracted once for the three probes (segmentation and depth label the same images)."""
    cache = {}
    s = linear_probe(features_fn, *tasks.segmentation, size, steps, cache=cache)
    c = knn_probe(features_fn, *tasks.segmentation, size, cache=cache)
    d = linear_probe(features_fn, *tasks.depth, size, steps, cache=cache)
    del cache
    v = evaluate_videos(features_fn, tasks.videos)
    warn_if_unreliable(s, "mIoU", f"{label} segmentation")
    warn_if_unreliable(d, "RMSE", f"{label} depth")
    if c["top-1"] <= c["trivial"]["top-1"]:
        print(f"warning: {label} classification: k-NN top-1 {c['top-1']:.3f} does not beat the trivial baseline's "
              f"{c['trivial']['top-1']:.3f}", file=sys.stderr)
    return {"mIoU": s["mIoU"], "RMSE": d["RMSE"], "delta1": d["delta1"], "J&F": v["J&F"], "J": v["J"], "F": v["F"],
            "top-1": c["top-1"], "trivial top-1": c["trivial"]["top-1"], "trivial mIoU": s["trivial"]["mIoU"],
            "trivial RMSE": d["trivial"]["RMSE"],
            "trivial delta1": d["trivial"]["delta1"], "seg probe loss": s["probe loss"],
            "depth probe loss": d["probe loss"],
            "probes converged": float(s["probe converged"] and d["probe converged"])}


def position_depth(tasks: EmbeddedTasks, size=PROBE_SIZE) -> dict:
    """The depth probe fitted on where each pixel is and nothing it shows: features are the row and column
    coordinates (and their squares) on a stride-4 grid. The embedded set's ground plane recedes with the row and
    its shapes' depths are drawn independently of how they look, so this probe bounds what depth can measure
    here: features beat it only by finding the shapes. Returns ``linear_probe``'s depth result."""
    def where(x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        rows, cols = torch.meshgrid(torch.linspace(0, 1, h // 4), torch.linspace(0, 1, w // 4), indexing="ij")
        return torch.stack([rows, cols, rows ** 2, cols ** 2])[None].expand(n, -1, -1, -1)

    return linear_probe(where, *tasks.depth, size)
