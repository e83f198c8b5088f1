"""The benchmark CLI runs every backend at a tiny size and writes well-formed results (no timing assertions)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from densessl.benchmarks import stages
from densessl.benchmarks.__main__ import BACKENDS, main
from densessl.pipeline import PAIR_BATCH, PairSpec, build_loader, scan_image_folder

REPO = Path(__file__).resolve().parents[1]


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
    """The serial profile times the reference loader's own steps: the batches it makes are the loader's."""
    files = list(scan_image_folder(synthetic_root / "train").files)
    spec = PairSpec(size=(64, 64), num_matches=8, min_matches=8)
    made = []
    ms = stages.reference(files, spec, batch=4, n=8, seed=3, batches=made)
    assert {"read", "decode", "geometry", "crop+resize", "correspondence+collate"} <= set(ms)
    loader = build_loader("torch", files, spec, batch_size=4, workers=0, seed=3, order="sequential")
    assert len(made) == 2
    for got, want in zip(made, loader):
        for key in PAIR_BATCH:
            assert torch.equal(got[key], want[key]), key


def test_photo_set_is_imagenet_like_and_reproducible(tmp_path):
    """Natural-photo JPEGs of ImageNet's sizes, 4:2:0, from scikit-image's photographs; the same seed writes the
    same bytes."""
    if not os.environ.get("DENSESSL_REQUIRE_BACKENDS"):
        pytest.importorskip("skimage")
    from PIL import Image

    from densessl.benchmarks.photos import SIZES, write_photo_set
    a = sorted(write_photo_set(tmp_path / "a", count=10).glob("*/*.jpg"))
    b = sorted(write_photo_set(tmp_path / "b", count=10).glob("*/*.jpg"))
    assert len(a) == 10 and [f.read_bytes() for f in a] == [f.read_bytes() for f in b]
    for f in a:
        with Image.open(f) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size in {s for s, _ in SIZES}
            assert im.layer[0][1:3] == (2, 2)  # luma sampled 2x2 against chroma: 4:2:0
    assert len({f.parent.name for f in a}) == 8  # one class per photograph


def test_train_step_benchmark_counts_flops_and_times_the_anchor(tmp_path, capsys, monkeypatch):
    """The step benchmark counts real FLOPs (a VADeR step is more than its query forward), times the RN50
    anchor in the same run, writes a profiler trace, and leaves no temporary folder behind."""
    import tempfile

    from densessl.benchmarks.train_step import main as train_step
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    train_step(["--objectives", "vader,mocov2", "--arch", "resnet18", "--size", "64", "--batch", "4", "--steps", "1",
                "--warmup", "1", "--sync-every", "2", "--profile", str(tmp_path / "prof")])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if "GFLOP" in line}
    assert set(rows) == {"anchor:", "vader", "mocov2"}
    gflop = {k: float(v.split("GFLOP")[0].split()[-1]) for k, v in rows.items()}
    assert gflop["vader"] > gflop["mocov2"] > 0  # the FPN decoder costs FLOPs
    assert (tmp_path / "prof" / "trace_vader.json").stat().st_size > 1000
    assert not list(tmp_path.glob("train_step-*"))  # the trainers' run folders are removed


def test_partial_decode_plans_cover_both_windows_and_decode_the_right_pixels(synthetic_root, capsys, tmp_path,
                                                                            monkeypatch):
    """The feasibility benchmark of issue 20 measures the right thing: its union covers both windows at the
    smallest scale that keeps them at view size, and its libjpeg region decoder returns the full decode's
    pixels of that region (at 8/8). The two outermost columns on each side may differ (measured up to 11 grey
    levels): chroma upsampling has no neighbour beyond a cropped edge."""
    import tempfile

    import simplejpeg

    from densessl.benchmarks import partial_decode
    from pair_rows import pair_row as draw

    spec = PairSpec(size=(64, 64))
    files = list(scan_image_folder(synthetic_root / "train").files)[:12]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    region = partial_decode.scanline_decoder()
    assert region is not None and not list(tmp_path.iterdir())  # built, loaded, and its library file removed
    for i, path in enumerate(files):
        data = open(path, "rb").read()
        plan = partial_decode.plan(data, i, spec)
        p = draw(spec, i, plan["h"], plan["w"])
        for top, left, h, w in ((p[0], p[1], p[2], p[3]), (p[5], p[6], p[7], p[8])):
            assert plan["top"] <= top and top + h <= plan["top"] + plan["height"]
            assert plan["left"] <= left and left + w <= plan["left"] + plan["width"]
        smallest = min(p[2], p[3], p[7], p[8]) / 64  # both windows stay at view size or above at m/8
        m = plan["m"]
        assert (m == 8 and smallest < 1) or (smallest * m / 8 >= 1 and (m == 1 or smallest * (m - 1) / 8 < 1))
        assert plan["atop"] % 8 == 0 and plan["aleft"] % 8 == 0 and plan["atop"] <= plan["top"]
        if region is None:
            continue
        full = simplejpeg.decode_jpeg(data, colorspace="RGB")
        rows, first = region(data, plan["top"], plan["left"], plan["height"], plan["width"], 8)
        assert first <= plan["left"] and first + rows.shape[1] >= plan["left"] + plan["width"]
        want = full[plan["top"]:plan["top"] + plan["height"], first:first + rows.shape[1]]
        assert rows.shape == want.shape
        diff = np.abs(rows.astype(int) - want)
        assert diff[:, 2:-2].max() <= 1 and diff.max() <= 16, (path, diff.max())
        scaled, _ = region(data, 0, 0, plan["h"], plan["w"], 4)
        assert scaled.shape == ((plan["h"] + 1) // 2, (plan["w"] + 1) // 2, 3)
    partial_decode.main(["--data", str(synthetic_root / "train"), "--reps", "1", "--size", "64"])
    out = capsys.readouterr().out
    assert "union of the two windows" in out and "simplejpeg, whole image" in out


def test_multicrop_benchmark_prints_every_row_in_one_run(synthetic_root, capsys):
    """Our multi-crop loader, its global-only run, DINO's PIL pattern and decoding per view, timed in one run,
    with the cost of one extra local view."""
    from densessl.benchmarks.multicrop import main as multicrop
    multicrop(["--data", str(synthetic_root / "train"), "--views", "2x64,2x32", "--batch", "4", "--workers", "1",
               "--reps", "1", "--backends", "torch,ffcv,dali"])
    out = capsys.readouterr().out
    rates = {line[:44].strip(): float(line[44:].split()[0].replace(",", "")) for line in out.splitlines()
             if "img/s" in line}
    assert len(rates) == 11 and all(r > 0 for r in rates.values()), out  # DINO, per view, SPDL x2, pairs, 3 x 2
    assert any(name.startswith("SPDL") for name in rates)
    assert all(f"{b}: one extra local view costs" in out for b in ("torch", "ffcv", "dali")), out


def test_the_cli_ends_without_a_traceback(synthetic_root, tmp_path):
    """A benchmark with FFCV once ended with Numba's dispatcher finaliser printing a KeyError ("Exception
    ignored in: <finalize object ...>") as the process wound down."""
    if not os.environ.get("DENSESSL_REQUIRE_BACKENDS"):
        pytest.importorskip("ffcv")
    out = subprocess.run([sys.executable, "-m", "densessl.benchmarks", "--data", str(synthetic_root / "train"),
                          "--backends", "torch,ffcv", "--workers", "1", "--batch", "4", "--size", "64", "--reps", "1",
                          "--quick", "--out", str(tmp_path / "bench")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "Exception ignored" not in out.stderr, out.stderr[-3000:]


def test_a_file_cut_into_parts_joins_back_to_its_digest(tmp_path):
    from densessl.benchmarks.gpu_bundle import split
    data = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    (tmp_path / "wheel").write_bytes(data)
    parts = split(tmp_path / "wheel", tmp_path / "parts", part_bytes=3_000)
    assert [p.name for p in parts] == ["part-00", "part-01", "part-02", "part-03"]
    assert all(p.stat().st_size <= 3_000 for p in parts)
    joined = b"".join(p.read_bytes() for p in parts)
    digest, count = (tmp_path / "parts" / "SHA256").read_text().split()[:2]
    assert joined == data and digest == hashlib.sha256(data).hexdigest() and count == "4"


@pytest.mark.slow
def test_the_gpu_script_rehearses_on_the_cpu(synthetic_root, tmp_path):
    """make gpu-bundle's wheels for this interpreter, installed by benchmarks/gpu.sh into a temporary target
    with no index, and every step of the GPU run at tiny sizes: the script cannot rot unseen."""
    from densessl.benchmarks.gpu_bundle import main as bundle
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    bundle(["--out", str(tmp_path / "bundle"), "--python", version])
    wheels = sorted(p.name.split("-")[0] for p in (tmp_path / "bundle" / "core").glob("*.whl"))
    assert wheels == ["densessl", "simplejpeg", "submitit", "timm"]
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--rehearse", str(tmp_path / "gpu")],
                         env={**os.environ, "BUNDLE": str(tmp_path / "bundle"), "DATA": str(synthetic_root),
                              "PYTHON": sys.executable}, capture_output=True, text=True, timeout=900)
    results = (tmp_path / "gpu" / "results.md").read_text()
    assert out.returncode == 0, results[-4000:] + out.stderr[-2000:]
    for step in ("pytest", "train_step", "train_step_vit", "trainer_e2e", "demo_and_evaluation", "compare"):
        assert f"## {step}: ok" in results, results[-4000:]
    assert "densessl from /tmp/densessl-site." in results  # the carried wheel, not this checkout
    assert "Every probe beats its trivial baseline" in results or "| random init [hypercolumn] |" in results
