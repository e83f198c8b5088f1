"""Downstream protocols: metric functions on hand-computed cases, and every protocol end to end on tiny fixture
folders in each real layout (VOC, Cityscapes, NYU, DAVIS) built from the embedded set; weight export."""

import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch.nn import functional as F
from PIL import Image

from densessl.evaluation import datasets
from densessl.evaluation.__main__ import main as evaluation_main
from densessl.evaluation.export import detectron2_name, export
from densessl.evaluation.features import LastStage, Hypercolumn, feature_extractor, feature_extractors
from densessl.evaluation.metrics import (boundary_f, boundary_map, boundary_radius, confusion, davis_statistics, depth_errors,
                                eigen_crop, iou_per_class, jaccard, mean_errors, mean_iou)
from densessl.evaluation.probe import fit_probe, trivial_probe
from densessl.evaluation.propagation import propagate
from densessl.model.builder import MoCo, ModelConfig, model_config
from densessl.model.methods import method_config
from densessl.model import checkpoint
from densessl.model.network import FPNDecoder, build_encoder, load_weights
from densessl.pipeline.synthetic import DAVIS_PALETTE
from released import released_checkpoints
from densessl.train.config import TrainConfig, to_dict


# ---- metrics on hand-computed cases -------------------------------------------------------------------------

def test_miou_perfect_empty_and_partial():
    truth = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 255]])
    assert mean_iou(confusion(truth.clamp(max=1), truth, 3)) == 1.0  # class 2 absent everywhere: left out
    assert np.isnan(float(iou_per_class(confusion(truth.clamp(max=1), truth, 3))[2]))
    wrong = 1 - truth.clamp(max=1)
    assert mean_iou(confusion(wrong, truth, 2)) == 0.0
    pred = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0]])  # one 0 read as 1; the ignored pixel does not count
    # class 0: tp 3, union 4 -> 0.75; class 1: tp 3, union 4 -> 0.75
    assert iou_per_class(confusion(pred, truth, 2)).tolist() == [0.75, 0.75]


def test_jaccard_and_boundary_f_cases():
    a = torch.zeros(40, 40, dtype=torch.bool)
    a[10:30, 10:30] = True
    empty = torch.zeros_like(a)
    assert jaccard(a, a) == 1.0 and boundary_f(a, a) == 1.0
    assert jaccard(empty, empty) == 1.0 and boundary_f(empty, empty) == 1.0
    assert jaccard(a, empty) == 0.0 and boundary_f(a, empty) == 0.0
    half = torch.zeros_like(a)
    half[10:30, 10:20] = True
    assert jaccard(half, a) == pytest.approx(0.5)
    far = torch.zeros(400, 400, dtype=torch.bool)
    far[100:300, 100:300] = True
    shifted = torch.roll(far, 20, dims=1)  # boundaries 20 px apart: beyond the 0.008 x diagonal (5 px) radius
    assert boundary_f(shifted, far) < 0.6
    assert boundary_f(torch.roll(far, 2, dims=1), far) == 1.0  # within the tolerance


def test_depth_errors_by_hand():
    """Valid pixels lie strictly inside the range; predictions are clamped to it; images weigh the same."""
    truth = torch.tensor([[1.0, 2.0], [4.0, 0.0]])  # 0 = no measurement
    pred = torch.tensor([[1.0, 3.0], [2.0, 20.0]])
    e = depth_errors(pred, truth)
    assert e["RMSE"] == pytest.approx(np.sqrt((0 + 1 + 4) / 3))
    assert e["AbsRel"] == pytest.approx((0 + 0.5 + 0.5) / 3)
    assert e["SqRel"] == pytest.approx((0 + 1 / 2 + 4 / 4) / 3)
    assert e["RMSE log"] == pytest.approx(np.sqrt((0 + np.log(1.5) ** 2 + np.log(2) ** 2) / 3))
    assert (e["delta1"], e["delta2"], e["delta3"]) == pytest.approx((1 / 3, 2 / 3, 2 / 3))  # ratios 1, 1.5, 2
    clamped = depth_errors(torch.tensor([[50.0]]), torch.tensor([[8.0]]))  # 50 m predicted: counted as 10 m
    assert clamped["RMSE"] == pytest.approx(2.0)
    assert mean_errors([e, clamped])["RMSE"] == pytest.approx((np.sqrt(5 / 3) + 2.0) / 2)  # not pooled
    crop = eigen_crop((480, 640))
    assert crop.sum() == (471 - 45) * (601 - 41) and crop[45, 41] and not crop[44, 41] and not crop[45, 601]


def boundary_by_definition(mask: np.ndarray) -> np.ndarray:
    """DAVIS's boundary map written out pixel by pixel: differs from the east, south or south-east neighbour
    (background outside), last row east only, last column south only, never the bottom-right pixel."""
    h, w = mask.shape
    at = lambda y, x: mask[y, x] if y < h and x < w else False  # noqa: E731
    out = np.zeros_like(mask)
    for y in range(h):
        for x in range(w):
            if y == h - 1 and x == w - 1:
                continue
            if y == h - 1:
                out[y, x] = mask[y, x] != at(y, x + 1)
            elif x == w - 1:
                out[y, x] = mask[y, x] != at(y + 1, x)
            else:
                out[y, x] = any(mask[y, x] != at(y + dy, x + dx) for dy, dx in ((0, 1), (1, 0), (1, 1)))
    return out


def f_by_definition(pred: np.ndarray, truth: np.ndarray) -> float:
    """Boundary F by brute force: a boundary pixel matches when a boundary pixel of the other mask lies within
    Euclidean distance ceil(0.008 x diagonal)."""
    bp, bt = boundary_by_definition(pred), boundary_by_definition(truth)
    if not bp.any() or not bt.any():
        return float(not bp.any() and not bt.any())
    r = np.ceil(0.008 * np.hypot(*truth.shape))
    p, t = np.argwhere(bp), np.argwhere(bt)
    close = ((p[:, None, :] - t[None, :, :]) ** 2).sum(-1) <= r * r
    precision, recall = close.any(1).mean(), close.any(0).mean()
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def test_boundary_f_by_hand():
    """Cases where the official definition and a square window, a rounded radius or an erosion edge differ."""
    a = np.zeros((10, 10), bool)
    a[4, 4] = True
    assert np.argwhere(boundary_map(torch.from_numpy(a)).numpy()).tolist() == [[3, 3], [3, 4], [4, 3], [4, 4]]
    b = np.zeros_like(a)
    b[6, 6] = True  # boundary blocks a diagonal step apart: sqrt(2) > radius 1, inside a 3x3 square window
    assert boundary_radius((10, 10)) == 1 and boundary_f(torch.from_numpy(b), torch.from_numpy(a)) == 0.0
    square = np.zeros((100, 120), bool)
    square[20:60, 30:70] = True  # radius ceil(1.25) = 2 (rounding gives 1): a 2-pixel shift matches everywhere
    assert boundary_radius((100, 120)) == 2
    assert boundary_f(torch.from_numpy(np.roll(square, 2, axis=1)), torch.from_numpy(square)) == 1.0
    assert boundary_f(torch.from_numpy(np.roll(square, 3, axis=1)), torch.from_numpy(square)) < 1.0


@pytest.mark.parametrize("seed", range(6))
def test_boundary_f_equals_the_definition(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(8, 40, 2)
    yy, xx = np.mgrid[:h, :w]
    masks = []
    for _ in range(2):  # a disc, a diagonal half-plane, or noise
        kind = rng.integers(3)
        if kind == 0:
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, 12)
            masks.append((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)
        elif kind == 1:
            masks.append(yy - xx * rng.uniform(0.3, 3) > rng.uniform(-20, 20))
        else:
            masks.append(rng.random((h, w)) < 0.3)
    pred, truth = masks
    np.testing.assert_array_equal(boundary_map(torch.from_numpy(truth)).numpy(), boundary_by_definition(truth))
    assert boundary_f(torch.from_numpy(pred), torch.from_numpy(truth)) == pytest.approx(f_by_definition(pred, truth))


def test_davis_statistics_by_hand():
    """Quarters as DAVIS cuts 8 frames: [0:3] and [5:8]; recall counts frames above 0.5."""
    stats = davis_statistics([1.0, 0.2, 0.8, 0.4, 0.6, 0.0, 0.9, 0.7])
    assert stats["mean"] == pytest.approx(4.6 / 8) and stats["recall"] == pytest.approx(5 / 8)
    assert stats["decay"] == pytest.approx(2.0 / 3 - 1.6 / 3)


def test_propagation_follows_matching_features():
    """Frame 1 is frame 0 shifted right by 3 cells: labels must move with the features."""
    torch.manual_seed(0)
    f0 = torch.randn(16, 12, 20)
    f1 = torch.roll(f0, 3, dims=2)
    labels = torch.zeros(2, 12, 20)
    labels[1, 4:8, 5:9] = 1
    labels[0] = 1 - labels[1]
    out = propagate([f0, f1], labels, topk=1, radius=4)
    moved = torch.roll(labels, 3, dims=2).argmax(0)
    assert torch.equal(out[1].argmax(0)[:, 3:], moved[:, 3:])  # columns 0-2 wrapped around: no match in radius
    assert out[1].argmax(0).sum() == 16


# ---- fixture folders in the real layouts ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def layouts(synthetic_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("layouts")
    splits = {s: sorted((synthetic_root / s).glob("*/*.jpg")) for s in ("train", "val")}

    def label(split, image, suffix=".png"):
        return synthetic_root / "labels" / split / image.parent.name / f"{image.stem}{suffix}"

    voc = base / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True)
    for split, images in splits.items():
        ids = [f"2007_{split}_{i:04d}" for i in range(len(images))]
        (voc / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for i, image in zip(ids, images):
            shutil.copy(image, voc / "JPEGImages" / f"{i}.jpg")
            classes = np.asarray(Image.open(label(split, image))).copy()
            classes[0, :] = 255  # VOC marks object borders "void"
            png = Image.fromarray(classes, mode="P")
            png.putpalette(DAVIS_PALETTE)
            png.save(voc / "SegmentationClass" / f"{i}.png")

    city = base / "cityscapes"
    label_ids = np.array([7, 8, 11, 12, 13], np.uint8)  # road, sidewalk, building, wall, fence -> train ids 0..4
    for split, images in splits.items():
        for i, image in enumerate(images):
            stem = f"aachen_{i:06d}_000019"
            for sub, name, array in (("leftImg8bit", f"{stem}_leftImg8bit.png", np.asarray(Image.open(image))),
                                     ("gtFine", f"{stem}_gtFine_labelIds.png",
                                      label_ids[np.asarray(Image.open(label(split, image)))])):
                (city / sub / split / "aachen").mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(city / sub / split / "aachen" / name)

    nyu = base / "nyu"
    for split, nyu_split in (("train", "train"), ("val", "test")):
        (nyu / nyu_split / "rgb").mkdir(parents=True)
        (nyu / nyu_split / "depth").mkdir(parents=True)
        for i, image in enumerate(splits[split]):
            shutil.copy(image, nyu / nyu_split / "rgb" / f"{i:05d}.jpg")
            shutil.copy(label(split, image, "_depth.png"), nyu / nyu_split / "depth" / f"{i:05d}.png")

    davis = base / "DAVIS"
    for sub in ("JPEGImages", "Annotations"):
        shutil.copytree(synthetic_root / "videos" / sub, davis / sub / "480p")
    (davis / "ImageSets" / "2017").mkdir(parents=True)
    names = sorted(p.name for p in (davis / "JPEGImages" / "480p").iterdir())
    (davis / "ImageSets" / "2017" / "val.txt").write_text("\n".join(names) + "\n")
    return {"voc": voc, "cityscapes": city, "nyu": nyu, "davis": davis}


def test_readers_decode_each_layout(layouts):
    voc = datasets.voc(layouts["voc"], "val")
    assert voc.num_classes == 21 and 255 in voc.read_target(0) and voc.read_target(0).max() == 255
    city = datasets.cityscapes(layouts["cityscapes"], "val")
    assert set(np.unique(city.read_target(0))) <= {0, 1, 2, 3, 4}  # labelIds 7..13 -> train ids
    depth = datasets.nyu_depth(layouts["nyu"], "test").read_target(0)
    assert depth.dtype == np.float32 and 1.0 < depth.max() <= 8.0  # metres (the embedded set: its back wall at 8 m)
    videos = datasets.davis(layouts["davis"], "val")
    assert len(videos) == 1 and len(videos[0].frames) == len(videos[0].masks) == 3
    with pytest.raises(FileNotFoundError, match="PASCAL VOC"):
        datasets.voc(layouts["nyu"], "val")


def test_nyu_official_mat_files_are_read(tmp_path):
    """The labelled set as downloaded: an HDF5 .mat (MATLAB writes column-major, so axes come reversed) and a
    MATLAB v5 splits.mat with 1-based indices."""
    import h5py
    from scipy.io import savemat
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 12, 16, 3), dtype=np.uint8)  # N, H, W, RGB as the test expects them
    depths = rng.uniform(0.5, 9.0, (5, 12, 16)).astype(np.float32)
    with h5py.File(tmp_path / "nyu_depth_v2_labeled.mat", "w") as f:
        f["images"] = images.transpose(0, 3, 2, 1)  # [N, 3, W, H]
        f["depths"] = depths.transpose(0, 2, 1)  # [N, W, H]
    savemat(tmp_path / "splits.mat", {"trainNdxs": np.array([[1], [2], [4]]), "testNdxs": np.array([[3], [5]])})
    test = datasets.nyu_depth(tmp_path, "test")
    assert len(test) == 2 and len(datasets.nyu_depth(tmp_path, "train")) == 3 and test.eigen_crop
    np.testing.assert_array_equal(np.asarray(Image.open(test.images[1])), images[4])
    np.testing.assert_allclose(test.read_target(0), depths[2], atol=5e-4)  # stored in millimetres


def test_voc_prefers_train_aug(layouts, tmp_path):
    root = tmp_path / "voc"
    shutil.copytree(layouts["voc"], root)
    shutil.copytree(root / "SegmentationClass", root / "SegmentationClassAug")
    shutil.copy(root / "ImageSets/Segmentation/train.txt", root / "ImageSets/Segmentation/train_aug.txt")
    assert datasets.voc(root, "train").name == "VOC2012 train_aug"


@pytest.mark.parametrize("protocol,dataset,metric", [
    ("segmentation", "voc", "mIoU"), ("segmentation", "cityscapes", "mIoU"), ("depth", "nyu", "RMSE"),
    ("propagation", "davis", "J"),
])
def test_protocols_run_end_to_end(layouts, tmp_path, protocol, dataset, metric):
    out = tmp_path / "eval"
    assert evaluation_main([protocol, "--dataset", dataset, "--root", str(layouts[dataset]), "--features",
                            "random:resnet18", "--probe-steps", "3", "--size", "96", "128", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"random init [hypercolumn]", "random init [dense]"}
    assert all(np.isfinite(r[metric]) for r in results.values())
    table = (out / "table.md").read_text()
    assert "| random init [hypercolumn] |" in table
    assert protocol == "propagation" or "trivial" in table  # probes show the baseline they must beat


def tiny_checkpoint(run_dir: Path, objective="vader", step=2) -> Path:
    """A checkpoint as the trainer writes one (model, model_config, config) in ``run_dir/checkpoints``."""
    cfg = TrainConfig(model=ModelConfig(arch="resnet18"), method=method_config(objective, queue_size=256))
    model = MoCo(cfg.model, cfg.method)
    return checkpoint.save({"model": model.state_dict(), "model_config": model_config(model.cfg, model.method_cfg),
                            "config": to_dict(cfg)}, run_dir / "checkpoints", step)


# ``model_config`` as densessl 0.1 wrote it: the MoCoConfig fields side by side
FLAT_MODEL_CONFIG = {"objective": "densecl", "arch": "resnet18", "dim": 128, "queue_size": 256, "momentum": 0.99,
                     "temperature": None, "loss_scale": 10.0, "symmetric": False, "negatives": "queue",
                     "exclusion_radius": 2.0, "densecl_lambda": 0.3, "densecl_warmup_steps": 7, "shuffle_bn": True,
                     "shuffle_groups": 2}


def test_checkpoints_of_densessl_0_1_still_load(tmp_path):
    """Evaluation, export and init_encoder= read a checkpoint whose model_config has 0.1's flat form; the method's
    renamed settings (densecl_lambda -> dense_weight) and defaults (temperature None) come through."""
    model = MoCo(ModelConfig(arch="resnet18"), method_config("densecl", queue_size=256))
    path = checkpoint.save({"model": model.state_dict(), "model_config": FLAT_MODEL_CONFIG,
                            "config": {"objective": "densecl", "arch": "resnet18"}},
                           tmp_path / "old" / "checkpoints", 5)
    loaded = checkpoint.load_model(path)
    assert loaded.method_cfg == method_config("densecl", queue_size=256, momentum=0.99, dense_weight=0.3,
                                              warmup_steps=7)
    assert not loaded.cfg.sync_bn and loaded.cfg.arch == "resnet18"
    for (name, got), want in zip(loaded.state_dict().items(), model.state_dict().values()):
        assert torch.equal(got, want), name
    assert [p.name for p in export(path, tmp_path / "out")][3:] == ["global_head.pth", "dense_head.pth"]
    assert "old/step_00000005 [dense]" in feature_extractors([f"checkpoint:{path}"], kinds=("dense",))
    net = MoCo(ModelConfig(arch="resnet18"), method_config(queue_size=256))
    checkpoint.load_encoder_weights(net.encoder_q.encoder, path)  # init_encoder=
    for got, want in zip(net.encoder_q.encoder.state_dict().values(), model.encoder_q.encoder.state_dict().values()):
        assert torch.equal(got, want)


def test_all_prints_one_table_with_figures(synthetic_root, tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "vader")
    out = tmp_path / "all"
    assert evaluation_main(["all", "--checkpoint", str(ckpt), "--root", str(synthetic_root), "--probe-steps", "3",
                            "--size", "96", "128", "--depth-bound-steps", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for row in ("vader/step_00000002 [hypercolumn]", "vader/step_00000002 [dense]", "random init [hypercolumn]"):
        assert f"| {row} |" in printed
    assert "depth RMSE" in printed
    # depth's references: position alone and the supervised bound, depth columns only, the bound with its cost
    assert re.search(r"\| depth from position alone \| - \| \d\.\d{3} \| \d\.\d{3} \| - \|", printed)
    assert re.search(r"\| supervised depth resnet18, 2 steps \(upper bound\) \[hypercolumn\] \| - \| \d", printed)
    assert re.search(r"Depth upper bound: resnet18 trained for depth with labels on the training scenes \(2 steps of "
                     r"8 images, \d+\.\d min\), read by the same probe: RMSE \d", (out / "table.md").read_text())
    for png in ("pca.png", "retrieval.png"):
        assert (out / png).stat().st_size > 1000


def test_baseline_extractors_give_stride_4_features(tmp_path):
    x = torch.randn(1, 3, 64, 96)
    r50 = torchvision.models.resnet50(weights=None).state_dict()
    assert LastStage("resnet50", r50).eval()(x).shape == (1, 2048, 16, 24)  # dilated, as in the paper
    column = Hypercolumn("resnet50", r50).eval()(x)
    assert column.shape == (1, 256 + 512 + 1024 + 2048, 16, 24)
    norms = [part.norm(dim=1) for part in column.split([256, 512, 1024, 2048], 1)]
    assert all(torch.allclose(n, torch.ones_like(n), atol=1e-4) for n in norms)  # each stage L2-normalised
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, tmp_path / "tv.pth")
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in state.items()}}, tmp_path / "moco.pth.tar")
    released_checkpoints(torchvision.models.resnet18(weights=None), torchvision.models.resnet18(weights=None),
                         tmp_path)
    for spec in (f"torchvision:{tmp_path / 'tv.pth'}", f"mocov2:{tmp_path / 'moco.pth.tar'}",
                 f"mocov2:{tmp_path / 'moco_v2.pth.tar'}", f"mocov2:{tmp_path / 'moco_v3.pth.tar'}"):
        found = feature_extractor(spec, "resnet18")
        name = f"{spec.split(':')[0]} {Path(spec.split(':')[1]).name}"
        assert list(found) == [f"{name} [hypercolumn]", f"{name} [c5]"]  # these files have no dense head
        assert found[f"{name} [c5]"](x).shape == (1, 512, 16, 24)
    with pytest.raises(ValueError, match="does not fit"):
        feature_extractor(f"torchvision:{tmp_path / 'tv.pth'}", "resnet50")


def test_probes_fit_to_convergence_and_know_their_trivial_baseline():
    """Depth: least squares recovers a linear target exactly. Segmentation: L-BFGS flattens its loss and
    separates a linearly separable labelling. The trivial probe predicts the majority class or the mean depth."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(6, 8, 5, 7, generator=g)
    depth = 5 + 0.3 * (feats * torch.randn(8, generator=g).view(1, 8, 1, 1)).sum(1)  # metres, all valid
    probe = fit_probe(feats, depth, "depth", ridge=0)
    assert probe.converged and probe.losses[-1] < 1e-3
    torch.testing.assert_close(probe(feats)[:, 0], depth, atol=1e-3, rtol=0)
    classes = feats[:, :3].argmax(1)
    seg = fit_probe(feats, classes, "segmentation", 3, steps=300)
    assert seg.converged and (seg(feats).argmax(1) == classes).float().mean() > 0.97
    assert (trivial_probe(classes, "segmentation", 8, 3)(feats).argmax(1) == classes.reshape(-1).mode().values).all()
    torch.testing.assert_close(trivial_probe(depth, "depth", 8)(feats), depth.mean().expand(6, 1, 5, 7))


def test_checkpoints_of_two_runs_keep_two_rows(tmp_path):
    """Runs checkpointed at the same step are named by run and step; a spec given twice is refused."""
    a, b = tiny_checkpoint(tmp_path / "a"), tiny_checkpoint(tmp_path / "b")
    assert a.name == b.name
    names = list(feature_extractors([f"checkpoint:{a}", f"checkpoint:{tmp_path / 'b'}", "random:resnet18"],
                                    kinds=("dense",)))
    assert names == ["a/step_00000002 [dense]", "b/step_00000002 [dense]", "random init [dense]"]
    with pytest.raises(ValueError, match=r"both be named 'a/step_00000002 \[dense\]'"):
        feature_extractors([f"checkpoint:{a}", f"checkpoint:{tmp_path / 'a'}"], kinds=("dense",))
    mocov2 = tiny_checkpoint(tmp_path / "m", objective="mocov2")
    assert list(feature_extractors([f"checkpoint:{mocov2}"], "resnet18")) == ["m/step_00000002 [hypercolumn]",
                                                                          "m/step_00000002 [c5]"]
    with pytest.raises(ValueError, match="has none of the feature kinds"):
        feature_extractors([f"checkpoint:{mocov2}"], "resnet18", kinds=("dense",))
    two_random = feature_extractors(["random:resnet18", "random:vit_tiny_patch8_224", "random:resnet18@1"],
                                    kinds=("c5",))
    assert list(two_random) == ["random init resnet18 [c5]", "random init vit_tiny_patch8_224 [c5]",
                                "random init resnet18 seed 1 [c5]"]  # random rows of two archs name their arch


def test_a_checkpoint_without_its_model_config_is_refused_clearly(tmp_path):
    model = MoCo(ModelConfig(arch="resnet18"), method_config(queue_size=256))
    torch.save({"model": model.state_dict(), "config": {"arch": "resnet18"}}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="no 'model_config'"):
        checkpoint.load_model(tmp_path / "old.pt")


def test_weight_load_errors_name_the_problem_whatever_the_message():
    """Shape mismatches name the offending keys; an error message of a single line is reported, not lost to an
    IndexError."""
    net = torchvision.models.resnet18(weights=None)
    state = torchvision.models.resnet34(weights=None).state_dict()
    state["conv1.weight"] = torch.zeros(3, 3, 7, 7)
    with pytest.raises(ValueError, match="size mismatch for conv1.weight"):
        load_weights(net, {k: v for k, v in state.items() if k in net.state_dict()}, "r34.pth")

    class OneLine(torch.nn.Linear):
        def load_state_dict(self, *args, **kwargs):
            raise RuntimeError("storage is not readable")
    with pytest.raises(ValueError, match="w.pth does not fit OneLine: storage is not readable"):
        load_weights(OneLine(2, 2), {}, "w.pth")


def test_extractors_move_their_inputs_to_their_weights(tmp_path):
    """Extractors accept images on any device and compute where their weights are (here: the meta device, so
    CI, which has no GPU, still proves the input was moved)."""
    fn = feature_extractor("random:resnet18", kinds=("hypercolumn",))["random init [hypercolumn]"].to("meta")
    assert fn(torch.randn(1, 3, 64, 64)).device.type == "meta"


def test_export_to_torchvision_and_detectron2(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "run")
    written = export(ckpt, tmp_path / "out")
    state = torch.load(written[0], weights_only=True)
    missing, unexpected = torchvision.models.resnet18(weights=None).load_state_dict(state, strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    d2 = pickle.loads(written[1].read_bytes())
    assert d2["matching_heuristics"] is True
    for key in ("stem.conv1.weight", "stem.conv1.norm.running_var", "res2.0.conv1.weight", "res2.1.conv2.norm.bias",
                "res3.0.shortcut.weight", "res3.0.shortcut.norm.running_mean", "res5.1.conv2.weight"):
        assert key in d2["model"], key
    assert len(d2["model"]) == len([k for k in state if not k.endswith("num_batches_tracked")])
    np.testing.assert_array_equal(d2["model"]["res4.0.conv1.weight"], state["layer3.0.conv1.weight"].numpy())
    FPNDecoder((64, 128, 256, 512)).load_state_dict(torch.load(written[3], weights_only=True))
    assert "STRIDE_IN_1X1: False" in written[2].read_text() and "FORMAT: RGB" in written[2].read_text()
    assert detectron2_name("layer1.0.downsample.1.weight") == "res2.0.shortcut.norm.weight"


def test_unreliable_probes_are_warned_about(capsys):
    from densessl.evaluation.probe import warn_if_unreliable
    good = {"mIoU": 0.5, "trivial": {"mIoU": 0.1}, "probe converged": True, "probe loss": 0.2}
    warn_if_unreliable(good, "mIoU", "m seg")
    assert capsys.readouterr().err == ""
    warn_if_unreliable({**good, "probe converged": False}, "mIoU", "m seg")
    assert "m seg: probe loss still moving" in capsys.readouterr().err
    depth = {"RMSE": 0.9, "trivial": {"RMSE": 0.8}, "probe converged": True, "probe loss": 0.2}
    warn_if_unreliable(depth, "RMSE", "m depth")  # lower is better: 0.9 loses to 0.8
    assert "m depth: probe RMSE 0.900 does not beat the trivial baseline's 0.800" in capsys.readouterr().err


def test_pooling_over_the_label_averages_its_pixels_and_weights_coarse_cells_by_their_share():
    from densessl.evaluation.classify import pooled_over_label
    targets = torch.zeros(2, 4, 4, dtype=torch.long)
    targets[0, :2, :2] = 3  # image 0: class 3 fills the top-left quarter
    targets[1, :, 3] = 1  # image 1: class 1 fills the last column
    feats = torch.arange(2 * 16, dtype=torch.float).view(2, 1, 4, 4)
    pooled = pooled_over_label(feats, targets, torch.tensor([3, 1]))
    assert pooled.shape == (2, 1, 1, 1)
    assert pooled[0].item() == pytest.approx(float(feats[0, 0, :2, :2].mean()))
    assert pooled[1].item() == pytest.approx(float(feats[1, 0, :, 3].mean()))
    coarse = torch.tensor([[[[1.0, 5.0], [2.0, 7.0]]]])  # 2x2 cells over the 4x4 labels: half of each right cell
    assert pooled_over_label(coarse, targets[1:], torch.tensor([1])).item() == pytest.approx((5 + 7) / 2)
    assert pooled_over_label(feats[:1], targets[:1], torch.tensor([2])).abs().sum() == 0  # no such pixels: 0


def test_shape_classification_reads_the_largest_shape_and_beats_its_trivial_baseline_only_with_informative_features(
        synthetic_root):
    """R4's probe: features that name each pixel's class (perfect segmentation features) classify every
    validation image's largest shape; features that carry nothing score exactly the trivial baseline, the
    training set's commonest label."""
    from densessl.evaluation.classify import largest_classes, shape_probe
    from densessl.evaluation.datasets import synthetic
    from densessl.evaluation.probe import resized_targets
    train, val = synthetic(synthetic_root, "train"), synthetic(synthetic_root, "val")
    labels = torch.cat([largest_classes(train), largest_classes(val)])
    assert labels.min() >= 1 and len(set(labels.tolist())) > 1  # every scene has a shape; several classes
    size = (32, 32)
    stream = iter(torch.cat([resized_targets(train, size), resized_targets(val, size)]))

    def informative(x):  # extract() reads train, then val, in order: the class of each stride-4 cell
        cells = torch.stack([next(stream)[2::4, 2::4] for _ in range(len(x))])
        return F.one_hot(cells, 8).permute(0, 3, 1, 2).float()

    good = shape_probe(informative, train, val, size)
    assert good["top-1"] == 1.0 and good["probe converged"]
    counts = torch.bincount(largest_classes(train))
    trivial = float((largest_classes(val) == counts.argmax()).float().mean())
    assert good["trivial"]["top-1"] == pytest.approx(trivial) and trivial < 1.0
    blind = shape_probe(lambda x: torch.ones(len(x), 4, 8, 8), train, val, size)
    assert blind["top-1"] == pytest.approx(trivial)


def test_a_feature_cache_extracts_each_image_set_once_and_changes_no_score(synthetic_root):
    """score_embedded's probes share one cache: segmentation and depth read the same scenes, so the cached
    features are the very tensors an uncached extraction computes, and the network sees each image set once."""
    from densessl.evaluation.datasets import synthetic
    from densessl.evaluation.probe import extract, linear_probe
    seg, depth = synthetic(synthetic_root, "train"), synthetic(synthetic_root, "train", "depth")
    calls = []

    def features(x):
        calls.append(len(x))
        return F.avg_pool2d(x, 4)

    cache = {}
    first = extract(features, seg, (32, 32), cache=cache)
    assert torch.equal(extract(features, depth, (32, 32), cache=cache), first)
    assert sum(calls) == len(seg)  # the depth set's images (the same scenes) were not run again
    extract(features, seg, (64, 64), cache=cache)
    assert sum(calls) == 2 * len(seg)  # another size is another entry
    val = synthetic(synthetic_root, "val", "depth")
    cached, plain = (linear_probe(features, depth, val, (32, 32), cache=c) for c in ({}, None))
    assert cached["RMSE"] == plain["RMSE"] and cached["probe loss"] == plain["probe loss"]


def test_depth_from_position_alone_reads_the_ground_plane(synthetic_root):
    """The embedded set's depth is mostly its floor and back wall, whose depth is fixed by the row: a probe that
    sees only where each pixel is beats the mean-depth baseline by far, and the image's content is not read."""
    from densessl.evaluation.embedded import EmbeddedTasks, position_depth
    where = position_depth(EmbeddedTasks.load(synthetic_root))
    assert where["RMSE"] < 0.7 * where["trivial"]["RMSE"] and where["delta1"] > where["trivial"]["delta1"]


def test_the_depth_bound_trains_the_encoder_for_depth(synthetic_root):
    """The supervised upper bound trains the encoder end to end on the depth labels (its loss falls, its weights
    move) and is read out as a hypercolumn; wrong input is refused in one line."""
    from densessl.evaluation.datasets import synthetic
    from densessl.evaluation.depth_bound import train_for_depth
    train = synthetic(synthetic_root, "train", "depth")
    torch.manual_seed(0)
    start = Hypercolumn("resnet18", build_encoder("resnet18").net.state_dict())
    trained, cost = train_for_depth("resnet18", train, (64, 96), steps=20, batch=4, seed=0)
    assert not trained.training and cost["steps"] == 20 and cost["batch"] == 4 and cost["seconds"] > 0
    assert cost["train L1"] < 0.8 * cost["first L1"]
    moved = [not torch.equal(a, b) for a, b in zip(start.state_dict().values(), trained.cpu().state_dict().values())
             if a.is_floating_point()]
    assert all(moved)  # every weight and statistic of the encoder trained
    assert trained(torch.zeros(1, 3, 64, 96)).shape[-2:] == (16, 24)
    with pytest.raises(ValueError, match="a depth set is needed"):
        train_for_depth("resnet18", synthetic(synthetic_root, "train"), (64, 96), steps=1)
    with pytest.raises(ValueError, match="at least one step"):
        train_for_depth("resnet18", train, (64, 96), steps=0)
