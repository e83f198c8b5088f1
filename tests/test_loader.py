import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from densessl.pipeline import (PAIR_BATCH, PairSpec, SeededSampler, ViewLoader, build_loader, check_batch,
                               scan_image_folder)
from densessl.pipeline.resize import resize_crop_aa
from ramp import assert_ramp_agrees, ramp_errors

SPEC = PairSpec(size=(64, 64), num_matches=8, min_matches=8)


def loader_for(root, workers=0, **kw):
    return build_loader("torch", root, SPEC, **{"batch_size": 4, "workers": workers, "seed": 7, **kw})


def first_batches(root, workers, n=3, epoch=1, **kw):
    loader = loader_for(root, workers, **kw)
    loader.set_epoch(epoch)
    out = []
    for i, batch in enumerate(loader):
        out.append(batch)
        if i + 1 == n:
            break
    return out


def test_batch_contract(synthetic_root):
    loader = loader_for(synthetic_root / "train")
    assert isinstance(loader, ViewLoader)
    for batch in first_batches(synthetic_root / "train", 0):
        check_batch(batch, SPEC)
    batch = first_batches(synthetic_root / "train", 0, n=1)[0]
    broken = {**batch, "match_xy2": batch["match_xy2"] + 1}  # the check itself must catch a wrong cell
    with pytest.raises(ValueError, match="floor"):
        check_batch(broken, SPEC)
    with pytest.raises(ValueError, match="channels_last"):
        check_batch({**batch, "view1": batch["view1"].contiguous()}, SPEC)


def test_same_batches_for_0_1_2_workers(synthetic_root):
    runs = [first_batches(synthetic_root / "train", w) for w in (0, 1, 2)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            for key in PAIR_BATCH:
                assert torch.equal(a[key], b[key]), key


def test_epochs_and_seeds_change_the_views(synthetic_root):
    a = first_batches(synthetic_root / "train", 0, n=1)[0]
    b = first_batches(synthetic_root / "train", 0, n=1, epoch=2)[0]
    assert not torch.equal(a["index"], b["index"]) or not torch.equal(a["geometry1"], b["geometry1"])


def test_positions_count_batches_and_states_resume(synthetic_root):
    """Iterating moves on to the next epoch; ``set_epoch(e, b)`` and ``state=`` continue at batch b of epoch e."""
    loader = loader_for(synthetic_root / "train")
    epoch0, epoch1 = list(loader), list(loader)
    assert len(epoch0) == len(epoch1) == len(loader) and not torch.equal(epoch0[0]["index"], epoch1[0]["index"])
    loader.set_epoch(1, 2)
    assert [torch.equal(x["view2"], y["view2"]) for x, y in zip(loader, epoch1[2:])] == [True] * (len(loader) - 2)
    fresh = loader_for(synthetic_root / "train")
    batches = iter(fresh)
    next(batches)
    assert fresh.state_dict() == {"epoch": 0, "batch": 1}
    resumed = loader_for(synthetic_root / "train", state=fresh.state_dict())
    assert torch.equal(next(iter(resumed))["index"], epoch0[1]["index"])
    list(batches)
    assert fresh.state_dict() == {"epoch": 1, "batch": 0}


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
        loader_for(tmp_path / "missing")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="no .* images"):
        loader_for(tmp_path / "empty")
    with pytest.raises(ValueError, match="fewer than one batch of 1000; lower batch_size"):
        loader_for(synthetic_root / "train", batch_size=1000)
    with pytest.raises(ValueError, match="backend='jax'"):
        build_loader("jax", synthetic_root / "train", SPEC, batch_size=2)
    with pytest.raises(ValueError, match="order='quasi_random' is not available with backend=torch"):
        loader_for(synthetic_root / "train", order="quasi_random")


@pytest.mark.parametrize("change,message", [
    ({"num_matches": 64, "min_matches": 32}, "raise min_matches"),
    ({"size": (102, 64)}, "not a multiple of the feature stride 4"),
    ({"scale": (0.5, 0.2)}, r"^scale=\(0.5, 0.2\) must satisfy"),
    ({"ratio": (2.0, 1.0)}, r"^ratio=\(2.0, 1.0\) must satisfy"),
    ({"flip_p": 1.5}, "^flip_p=1.5 must be a probability"),
    ({"min_matches": 300, "num_matches": 8}, "exceeds the 256 cells of the 16x16 feature grid"),
    ({"max_tries": 0}, "^max_tries=0"),
    ({"min_matches": -1}, "^min_matches=-1 must be at least 1"),
    ({"stride": -1}, "^stride=-1 must be >= 1"),
    ({"size": 64}, None),  # one number: square views
])
def test_pair_spec_says_what_is_wrong(change, message):
    """One line that starts with the setting at fault (the trainer prefixes its section: views.)."""
    if message is None:
        assert PairSpec(**{"num_matches": 8, "min_matches": 8, **change}).size == (64, 64)
        return
    with pytest.raises(ValueError, match=message):
        PairSpec(**{"size": (64, 64), "num_matches": 8, "min_matches": 8, **change})


def test_readme_table_is_the_contract():
    """pipeline/README.md shows the batch contract and its pair keys as ``contract.batch_table()`` writes them:
    docs cannot drift."""
    from pathlib import Path

    from densessl.pipeline.contract import batch_table
    readme = (Path(__file__).resolve().parents[1] / "pipeline" / "README.md").read_text()
    assert batch_table() in readme and batch_table(pairs=True) in readme


def test_coordinate_ramp_end_to_end(ramp_root):
    files = scan_image_folder(ramp_root).files
    batches = list(build_loader("torch", ramp_root, PairSpec(size=(96, 96)), batch_size=4, workers=2))
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
