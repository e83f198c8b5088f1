"""DALI backend, run in CPU-only mode (device_id=None) so CI needs no GPU; GPU (mixed decode) variants are
marked ``gpu`` and skip without one."""

import os

import numpy as np
import pytest
import torch

if os.environ.get("DENSESSL_REQUIRE_BACKENDS"):
    import nvidia.dali  # noqa: F401  (`make test` installs DALI: a missing one is a failure, not a skip)
else:
    pytest.importorskip("nvidia.dali")

from densessl.pipeline import PAIR_BATCH, PairSpec, build_loader, check_batch, scan_image_folder  # noqa: E402
from densessl.pipeline.folder import decode_rgb  # noqa: E402
from densessl.pipeline.geometry import Crop, sample_view_pair  # noqa: E402
from densessl.pipeline.loader import render_view  # noqa: E402
from ramp import assert_ramp_agrees, crop_from_affine, ramp_errors  # noqa: E402

SPEC = PairSpec(size=(96, 96))
DEVICES = [None, pytest.param(0, marks=pytest.mark.gpu, id="gpu")]


def dali_loader(root, spec=SPEC, **kw):
    return build_loader("dali", root, spec, **{"batch_size": 4, "workers": 2, **kw})


@pytest.mark.parametrize("device_id", DEVICES)
def test_batch_contract_and_ramp_end_to_end(ramp_root, device_id):
    files = list(scan_image_folder(ramp_root).files)
    batches = list(dali_loader(ramp_root, device=device_id))
    for batch in batches:
        check_batch(batch, SPEC)
    for err in ramp_errors(batches, files):
        assert_ramp_agrees(err)
    with pytest.raises(AssertionError):
        assert_ramp_agrees(ramp_errors(batches, files, mirror=True)[0])


@pytest.mark.parametrize("device_id", DEVICES)
def test_views_rebuilt_from_returned_geometry(synthetic_root, device_id):
    files = list(scan_image_folder(synthetic_root / "train").files)
    batch = next(iter(dali_loader(synthetic_root / "train", batch_size=8, device=device_id)))
    right, wrong = [], []
    for b in range(8):
        image = decode_rgb(open(files[int(batch["index"][b])], "rb").read())
        for v in ("1", "2"):
            crop = crop_from_affine(batch["geometry" + v][b].double().numpy(), SPEC.size)
            got = batch["view" + v][b].permute(1, 2, 0).float().cpu().numpy()
            rebuilt = render_view(image, crop, SPEC.size).astype(np.float32)
            mirrored = render_view(image, Crop(crop.top, crop.left, crop.height, crop.width, not crop.flip),
                                   SPEC.size).astype(np.float32)
            right.append(np.abs(got - rebuilt).mean())
            wrong.append(np.abs(got - mirrored).mean())
    assert max(right) < 3.0, right  # grey levels: decoders (nvJPEG on GPU) and antialiased resizes differ slightly
    assert np.mean(wrong) > 5 * np.mean(right)


def test_sharding_covers_every_sample_once(synthetic_root):
    n = len(scan_image_folder(synthetic_root / "train"))
    seen = []
    for rank in range(2):
        loader = dali_loader(synthetic_root / "train", batch_size=5, rank=rank, world_size=2, drop_last=False)
        seen += [i for batch in loader for i in batch["index"].tolist()]
    assert sorted(seen) == list(range(n))


def test_ranks_draw_their_own_views_and_share_each_epoch(synthetic_root):
    """Ranks differ in pipeline seed (else rank r's k-th sample repeats rank 0's windows) but not in the reader's
    shuffle: every epoch's shards still partition the data."""
    n = len(scan_image_folder(synthetic_root / "train"))
    loaders = [dali_loader(synthetic_root / "train", batch_size=4, rank=r, world_size=2) for r in range(2)]
    epochs = [[list(loader) for loader in loaders] for _ in range(2)]
    first = [batches[0]["geometry1"] for batches in epochs[0]]
    assert not torch.equal(*first)  # the fixture's images share one size: same draws would give same windows
    for per_rank in epochs:
        seen = [i for batches in per_rank for b in batches for i in b["index"].tolist()]
        assert len(seen) == len(set(seen)) == 2 * (n // 2 // 4 * 4)


@pytest.mark.parametrize("taken", [2, "all"])
def test_restored_state_continues_exactly(synthetic_root, taken):
    """``state_dict`` mid-epoch or after its last batch, then a new loader from it: the same batches as the
    uninterrupted loader."""
    loader = dali_loader(synthetic_root / "train", seed=5)
    list(loader)
    loader.set_epoch(1)
    batches = iter(loader)
    taken = len(loader) if taken == "all" else taken
    for _ in range(taken):
        next(batches)
    state = loader.state_dict()
    want = list(batches)
    loader.set_epoch(2)
    want += list(loader)
    restored = dali_loader(synthetic_root / "train", seed=5, state=state)
    got = []
    for epoch, start in [(1, taken), (2, 0)] if taken < len(loader) else [(2, 0)]:  # as the trainer resumes
        restored.set_epoch(epoch, start)
        got += list(restored)
    assert len(got) == len(want) > 0
    for x, y in zip(got, want):
        for key in PAIR_BATCH:
            assert torch.equal(x[key], y[key]), key


def test_same_seed_same_batches(synthetic_root):
    a, b = (list(dali_loader(synthetic_root / "train", seed=3)) for _ in range(2))
    for x, y in zip(a, b):
        for key in PAIR_BATCH:
            assert torch.equal(x[key], y[key]), key


def test_crop_windows_follow_the_reference_distribution(synthetic_root):
    """DALI's window generator and the reference sampler, both conditioned on overlap: same statistics."""
    loader = dali_loader(synthetic_root / "train", batch_size=8)
    dali = []
    for epoch in range(12):
        for batch in loader:
            dali += [crop_from_affine(g.double().numpy(), SPEC.size) for g in batch["geometry1"]]
    h, w = 96, 128  # the synthetic fixture's image size
    ref = [sample_view_pair(seed, h, w, SPEC).crop1 for seed in range(4000)]
    for stat in (lambda c: c.height * c.width / (h * w), lambda c: np.log(c.width / c.height),
                 lambda c: c.flip):
        x, y = np.array([stat(c) for c in dali], float), np.array([stat(c) for c in ref], float)
        assert abs(x.mean() - y.mean()) < 4 * np.hypot(x.std() / np.sqrt(len(x)), y.std() / np.sqrt(len(y)))


def test_overlap_rule_enforced_and_retries_counted(synthetic_root):
    loader = dali_loader(synthetic_root / "train", PairSpec(size=(96, 96), min_matches=400, max_tries=3))
    batches = list(loader)  # the kernel raises if any pair shares fewer than 32 cells
    tries = torch.cat([b["tries"] for b in batches])
    assert ((tries >= 0) & (tries <= 3)).all()
    assert 0 < (tries == 0).sum() <= (tries != 1).sum() < len(tries)  # some redrawn, some fell back


def test_cpu_graph_decodes_the_union_box_with_the_whole_images_pixels(tmp_path):
    """The CPU graph decodes only the union box of each pair's windows (issue 20). On natural photos its views
    equal, bit for bit, the views the reference filter cuts from the whole decoded image."""
    pytest.importorskip("skimage")
    from densessl.benchmarks.photos import write_photo_set
    root = write_photo_set(tmp_path / "photos", count=24)
    files = list(scan_image_folder(root).files)
    spec = PairSpec(size=(128, 128))
    compared = 0
    for batch in dali_loader(root, spec, batch_size=8):
        for b in range(batch["index"].shape[0]):
            image = decode_rgb(open(files[int(batch["index"][b])], "rb").read())
            for v in ("1", "2"):
                crop = crop_from_affine(batch["geometry" + v][b].double().numpy(), spec.size)
                got = batch["view" + v][b].permute(1, 2, 0).numpy()
                np.testing.assert_array_equal(got, render_view(image, crop, spec.size))
                compared += 1
    assert compared == 48


def test_state_of_an_earlier_graph_is_refused_in_one_line(synthetic_root):
    """A loader state without this graph's mark (densessl before one view engine had a pair graph and a views
    graph) cannot be restored into today's graph: refused in one line, not restored into the wrong operators."""
    loader = dali_loader(synthetic_root / "train", seed=5)
    next(iter(loader))
    state = loader.state_dict()
    assert dali_loader(synthetic_root / "train", seed=5, state=state).state_dict()["graph"] == state["graph"]
    old = {k: v for k, v in state.items() if k != "graph"}
    with pytest.raises(ValueError, match="^the DALI loader state was saved by an earlier densessl's DALI graph"):
        dali_loader(synthetic_root / "train", seed=5, state=old)


@pytest.mark.parametrize("views", ["pairs", "multicrop"])
def test_gpu_cutter_lays_out_rows_as_the_numba_cutter(synthetic_root, views):
    """The GPU graph's cutter (``resize_views_op``: DALI's ROI resize and flip per view, flattened and
    concatenated) runs on the CPU here, on the whole decoded image: the same windows as the CPU graph give rows
    within DALI's resize of the Numba cutter's, view by view in ``ViewSpec.offsets`` order."""
    from nvidia.dali import fn, pipeline_def, types

    from densessl.pipeline import MultiCropViews
    from densessl.pipeline.dali import resize_views_op, views_params_op, views_pipeline

    spec = (PairSpec(size=64, num_matches=8, min_matches=64).view_spec if views == "pairs" else
            MultiCropViews(crops="2x64,4x32", min_cells=16, num_matches=8).view_spec)
    files = list(scan_image_folder(synthetic_root / "train").files)
    order = list(range(len(files)))

    @pipeline_def
    def whole_image(files):
        jpegs, index = fn.readers.file(files=files, labels=order, shard_id=0, num_shards=1, shuffle_after_epoch=True,
                                       name="Reader")
        windows, seeds, shape, anchor, box = views_params_op(jpegs, spec)
        image = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        return resize_views_op(image, windows, spec), windows

    kw = dict(batch_size=4, num_threads=1, device_id=None, seed=1)
    rows, windows = (np.stack([np.array(t) for t in out]) for out in whole_image(files, **kw).run())
    cpu = views_pipeline(dict(files=files, labels=order), spec, 0, 1, "cpu", **kw).run()
    cpu_rows, cpu_windows = (np.stack([np.array(t) for t in out]) for out in cpu[:2])
    np.testing.assert_array_equal(windows, cpu_windows)
    assert rows.shape == cpu_rows.shape == (4, spec.offsets[-1])
    for v in range(len(spec.views())):  # each view in its place: a swapped or mirrored view differs by ~40 levels
        a, b = (r[:, spec.offsets[v]:spec.offsets[v + 1]].astype(int) for r in (rows, cpu_rows))
        assert np.abs(a - b).mean() < 0.5, v


def test_names_with_spaces_and_line_breaks_are_read(tmp_path, ramp_root):
    """DALI reads the index through a file list (``dali.write_file_list``): a space in a name is fine there, a
    line break is not, and such an index goes to DALI as a list of paths instead."""
    source = next(p for p in sorted(ramp_root.rglob("*.jpg")))
    for names in (["a b.jpg", "c.jpg"], ["a b.jpg", "c\nd.jpg"]):
        root = tmp_path / str(len(list(tmp_path.iterdir())))
        (root / "class one").mkdir(parents=True)
        for name in names:
            (root / "class one" / name).write_bytes(source.read_bytes())
        batch = next(iter(dali_loader(root, batch_size=2, workers=1)))
        assert sorted(batch["index"].tolist()) == [0, 1]
