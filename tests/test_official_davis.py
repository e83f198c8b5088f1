"""Our propagation scores against the official DAVIS-2017 evaluation code on the same predicted masks.

Runs where a checkout of davis2017-evaluation is named by ``DAVIS2017_EVALUATION`` (its code needs OpenCV and
scikit-image); skipped elsewhere, since CI cannot fetch it. Measured result: README, section Evaluation.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

OFFICIAL = os.environ.get("DAVIS2017_EVALUATION")
pytestmark = pytest.mark.skipif(not OFFICIAL, reason="set DAVIS2017_EVALUATION to a davis2017-evaluation checkout")


def official_scores(annotations: Path, masks: Path) -> dict[str, float]:
    """The official metrics and statistics, semi-supervised protocol (first and last frames left out)."""
    sys.path.insert(0, OFFICIAL)
    from davis2017.metrics import db_eval_boundary, db_eval_iou
    from davis2017.utils import db_statistics

    stats = {"J": [], "F": []}
    for video in sorted(p for p in annotations.iterdir() if p.is_dir()):
        frames = sorted(video.glob("*.png"))
        truth = np.stack([np.array(Image.open(f)) for f in frames])[1:-1]
        pred = np.stack([np.array(Image.open(masks / video.name / f.name)) for f in frames[1:-1]])
        for o in range(1, int(np.array(Image.open(frames[0])).max()) + 1):
            for name, fn in (("J", db_eval_iou), ("F", db_eval_boundary)):
                stats[name].append(db_statistics(fn(truth == o, pred == o)))
    out = {}
    for name, rows in stats.items():
        mean, recall, decay = np.mean(rows, axis=0)
        out.update({name: mean, f"{name} recall": recall, f"{name} decay": decay})
    return out


def test_propagation_scores_equal_the_official_code(synthetic_root, tmp_path):
    from densessl.evaluation.__main__ import main
    out = tmp_path / "eval"
    assert main(["propagation", "--dataset", "synthetic", "--root", str(synthetic_root), "--features",
                 "random:resnet18", "--arch", "resnet18", "--save-masks", "--out", str(out)]) == 0
    ours = json.loads((out / "results.json").read_text())["random init"]
    official = official_scores(synthetic_root / "videos" / "Annotations", out / "masks" / "random_init")
    for key, value in official.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key
