import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import BATCH_KEYS, SeededSampler, ViewSpec, make_loader, scan_image_folder
from pipeline.resize import resize_crop_aa
from ramp import assert_ramp_agrees, ramp_errors

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


def test_coordinate_ramp_end_to_end(ramp_root):
    files = scan_image_folder(ramp_root).files
    loader = make_loader(ramp_root, batch_size=4, workers=2, seed=0, spec=ViewSpec(size=(96, 96)),
                         num_matches=32, min_matches=32)
    batches = list(loader)
    for err in ramp_errors(batches, files):
        assert_ramp_agrees(err)
    with pytest.raises(AssertionError):
        assert_ramp_agrees(ramp_errors(batches, files, mirror=True)[0])


@settings(max_examples=40)
@given(st.integers(0, 60), st.integers(0, 80), st.integers(1, 96), st.integers(1, 128), st.booleans(),
       st.sampled_from([(24, 24), (64, 48), (160, 224)]))
def test_numba_resize_matches_the_reference_filter(top, left, height, width, flip, size):
    image = np.random.default_rng(top * 1000 + left).integers(0, 256, (96 + 60, 128 + 80, 3), dtype=np.uint8)
    out = np.empty((*size, 3), np.uint8)
    resize_crop_aa(image, top, left, height, width, flip, out)
    window = torch.from_numpy(image[top:top + height, left:left + width]).permute(2, 0, 1)[None].float()
    want = torch.nn.functional.interpolate(window, size=size, mode="bilinear", antialias=True, align_corners=False)
    want = want.round().clamp(0, 255)[0].permute(1, 2, 0).numpy()
    if flip:
        want = want[:, ::-1]
    assert np.abs(out.astype(int) - want.astype(int)).max() <= 1
