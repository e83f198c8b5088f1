"""The benchmark CLI runs every backend at a tiny size and writes well-formed results (no timing assertions)."""

import json
import os

import numpy as np
import pytest

from benchmarks import stages
from benchmarks.__main__ import BACKENDS, main
from pipeline import ViewSpec, scan_image_folder
from pipeline.loader import ViewPairDataset


def test_cli_runs_every_backend_and_writes_json_and_png(synthetic_root, tmp_path):
    if not os.environ.get("DENSESSL_REQUIRE_BACKENDS"):
        pytest.importorskip("ffcv")
        pytest.importorskip("nvidia.dali")
    out = tmp_path / "bench"
    main(["--data", str(synthetic_root / "train"), "--workers", "1", "--batch", "4", "--size", "64", "--reps",
          "1", "--sweep", "--quick", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert set(results["backends"]) == set(BACKENDS)
    for name, r in results["backends"].items():
        assert r["pairs_per_s"] > 0 and len(r["runs"]) == 1 and r["cores"] >= 0, name  # tiny runs can read 0 CPU s
        assert r["decode_ceiling"] > 0 and r["stages_ms"] and all(v >= 0 for v in r["stages_ms"].values()), name
        assert results["sweep"][name][0][0] == 1
    assert max(r["cores"] for r in results["backends"].values()) > 0  # CPU time is counted (workers included)
    assert (out / "loaders.png").stat().st_size > 10_000


def test_stage_profile_does_what_the_loader_does(synthetic_root):
    """The serial profile times the reference loader's own steps: same views for the same seed."""
    files = list(scan_image_folder(synthetic_root / "train").files)
    spec = ViewSpec(size=(64, 64))
    ms = stages.reference(files, spec, batch=4, n=8)
    assert {"read", "decode", "geometry", "crop+resize", "correspondence", "collate"} <= set(ms)
    from pipeline.geometry import sample_view_pair
    from pipeline.folder import decode_rgb
    from pipeline.loader import render_view
    item = ViewPairDataset(files, spec)[(3, 3)]
    pixels = decode_rgb(open(files[3], "rb").read())
    pair = sample_view_pair(3, pixels.shape[0], pixels.shape[1], spec)
    np.testing.assert_array_equal(item["view1"], render_view(pixels, pair.crop1, spec.size))
