import numpy as np
import pytest
import torch

from pipeline import BATCH_KEYS, SeededSampler, ViewSpec, invert_affine, make_loader, scan_image_folder
from pipeline.geometry import apply_affine

SPEC = ViewSpec(size=(64, 64))


def first_batches(root, workers, n=3, **kw):
    loader = make_loader(root, batch_size=4, workers=workers, seed=7, spec=SPEC, num_matches=8, min_matches=8, **kw)
    loader.sampler.set_epoch(1)
    out = []
    for i, batch in enumerate(loader):
        out.append(batch)
        if i + 1 == n:
            break
    return out


def test_batch_contract(synthetic_root):
    batch = first_batches(synthetic_root / "train", 0, n=1)[0]
    assert set(batch) == set(BATCH_KEYS)
    b = 4
    expect = {"view1": ((b, 3, 64, 64), torch.uint8), "view2": ((b, 3, 64, 64), torch.uint8),
              "geometry1": ((b, 2, 3), torch.float32), "geometry2": ((b, 2, 3), torch.float32),
              "matches": ((b, 8, 2), torch.int64), "match_xy2": ((b, 8, 2), torch.float32),
              "index": ((b,), torch.int64)}
    for key, (shape, dtype) in expect.items():
        assert tuple(batch[key].shape) == shape and batch[key].dtype == dtype, key
    assert batch["view1"].is_contiguous(memory_format=torch.channels_last)
    assert ((batch["matches"] >= 0) & (batch["matches"] < 16 * 16)).all()


def test_same_batches_for_0_1_2_workers(synthetic_root):
    runs = [first_batches(synthetic_root / "train", w) for w in (0, 1, 2)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            for key in BATCH_KEYS:
                assert torch.equal(a[key], b[key]), key


def test_epochs_and_seeds_change_the_views(synthetic_root):
    a = first_batches(synthetic_root / "train", 0, n=1)[0]
    loader = make_loader(synthetic_root / "train", batch_size=4, workers=0, seed=7, spec=SPEC, num_matches=8,
                         min_matches=8)
    loader.sampler.set_epoch(2)
    b = next(iter(loader))
    assert not torch.equal(a["index"], b["index"]) or not torch.equal(a["geometry1"], b["geometry1"])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_shards_cover_every_sample_once(world):
    shards = [list(SeededSampler(10, seed=3, rank=r, world_size=world, drop_last=False)) for r in range(world)]
    indices = [i for s in shards for i, _ in s]
    assert set(indices) == set(range(10)) and len(indices) == -(-10 // world) * world
    if world == 1:
        assert sorted(indices) == list(range(10))
    seeds = {i: seed for s in shards for i, seed in s}
    single = dict(SeededSampler(10, seed=3))
    assert seeds == single, "a sample's seed must not depend on the world size"


def test_sampler_resumes_mid_epoch():
    s = SeededSampler(50, seed=1, rank=1, world_size=2)
    s.set_epoch(4)
    full = list(s)
    s.set_epoch(4, start=7)
    assert list(s) == full[7:] and len(s) == len(full) - 7


def test_loader_rejects_bad_configuration(tmp_path, synthetic_root):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_loader(tmp_path / "missing", batch_size=2)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="no .* images"):
        make_loader(tmp_path / "empty", batch_size=2)
    with pytest.raises(ValueError, match="raise min_matches"):
        make_loader(synthetic_root / "train", batch_size=2, num_matches=64, min_matches=32)
    with pytest.raises(ValueError, match="fewer than one batch"):
        make_loader(synthetic_root / "train", batch_size=1000)


def bilinear(image_hwc: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Sample an HxWxC image at continuous (x, y) points (pixel centres at +0.5)."""
    h, w = image_hwc.shape[:2]
    x = np.clip(xy[:, 0] - 0.5, 0, w - 1)
    y = np.clip(xy[:, 1] - 0.5, 0, h - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    img = image_hwc.astype(np.float64)
    top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
    bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def ramp_source_coords(view_chw: torch.Tensor, xy: np.ndarray, source_hw) -> np.ndarray:
    rgb = bilinear(view_chw.permute(1, 2, 0).numpy(), xy)
    return np.stack([rgb[:, 0] / 255 * source_hw[1], rgb[:, 1] / 255 * source_hw[0]], -1)


def ramp_errors(batches, files, stride=4, mirror=False):
    """Source-pixel errors (x, y) at every match: decoded view 1 vs its geometry, and view 1 vs view 2.

    ``mirror=True`` predicts with a horizontally mirrored view-1 geometry, a control the check must reject.
    """
    from PIL import Image
    geometry_err, pair_err = [], []
    for batch in batches:
        for b in range(batch["index"].shape[0]):
            with Image.open(files[int(batch["index"][b])]) as im:
                src_hw = (im.height, im.width)
            g1 = batch["geometry1"][b].double().numpy()
            m = batch["matches"][b].numpy()
            gw = batch["view1"].shape[-1] // stride
            p1 = (np.stack([m[:, 0] % gw, m[:, 0] // gw], -1) + 0.5) * stride
            p2 = batch["match_xy2"][b].double().numpy() * stride
            s1 = ramp_source_coords(batch["view1"][b], p1, src_hw)
            s2 = ramp_source_coords(batch["view2"][b], p2, src_hw)
            predicted = apply_affine(invert_affine(g1), p1)
            if mirror:
                predicted[:, 0] = src_hw[1] - predicted[:, 0]
            geometry_err.append(s1 - predicted)
            pair_err.append(s1 - s2)
    return np.concatenate(geometry_err), np.concatenate(pair_err)


def assert_ramp_agrees(err):
    """Measured on the reference loader: |err| median 0.2 px, 99th percentile 1 px, bias 0.02 px."""
    assert np.abs(err).max() < 2.5, f"worst error {np.abs(err).max():.2f} source px"
    assert np.abs(err).mean() < 0.4, f"mean error {np.abs(err).mean():.2f} source px"
    assert np.abs(err.mean(0)).max() < 0.2, f"bias {err.mean(0)} source px"


def test_coordinate_ramp_end_to_end(ramp_root):
    files = scan_image_folder(ramp_root).files
    loader = make_loader(ramp_root, batch_size=4, workers=2, seed=0, spec=ViewSpec(size=(96, 96)),
                         num_matches=32, min_matches=32)
    batches = list(loader)
    for err in ramp_errors(batches, files):
        assert_ramp_agrees(err)
    with pytest.raises(AssertionError):
        assert_ramp_agrees(ramp_errors(batches, files, mirror=True)[0])
