"""FFCV backend: .beton round trip, one-decode two-view decoder, geometry, determinism."""

import os

import numpy as np
import pytest
import torch

if os.environ.get("DENSESSL_REQUIRE_BACKENDS"):
    import ffcv  # noqa: F401  (`make test` installs FFCV: a missing one is a failure, not a skip)
else:
    pytest.importorskip("ffcv")

from ffcv.fields.basics import IntDecoder  # noqa: E402
from ffcv.fields.rgb_image import SimpleRGBImageDecoder  # noqa: E402
from ffcv.loader import Loader, OrderOption  # noqa: E402

from densessl.pipeline import PAIR_BATCH, PairSpec, build_loader, check_batch, scan_image_folder  # noqa: E402
from densessl.pipeline.ffcv import read_stored_image, use_private_state_types, write_beton  # noqa: E402
from densessl.pipeline.folder import decode_rgb  # noqa: E402
from densessl.pipeline.loader import render_view  # noqa: E402
from ramp import assert_ramp_agrees, crop_from_affine, ramp_errors  # noqa: E402

SPEC = PairSpec(size=(96, 96))


@pytest.fixture(scope="module")
def raw_beton(synthetic_root, tmp_path_factory):
    return write_beton(synthetic_root / "train", tmp_path_factory.mktemp("ffcv") / "raw.beton", write_mode="raw")


def ffcv_loader(beton, **kw):
    return build_loader("ffcv", beton, SPEC, **{"batch_size": 4, "workers": 2, **kw})


def test_beton_round_trip_keeps_every_sample_and_label(synthetic_root, raw_beton):
    folder = scan_image_folder(synthetic_root / "train")
    use_private_state_types()  # FFCV's own Loader, in a process that also runs DALI's operators
    loader = Loader(str(raw_beton), batch_size=5, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()], "index": [IntDecoder()]})
    images, labels, indices = [], [], []
    for image, label, index in loader:
        images += list(image.copy())
        labels += label.reshape(-1).tolist()
        indices += index.reshape(-1).tolist()
    assert indices == list(range(len(folder))) and labels == folder.labels.tolist()
    for i in (0, len(folder) // 2, len(folder) - 1):
        original = decode_rgb(open(folder.files[i], "rb").read())
        np.testing.assert_array_equal(images[i], original)
        np.testing.assert_array_equal(read_stored_image(raw_beton, i), original)


@pytest.mark.parametrize("write_mode", ["raw", "jpg"])
def test_batch_contract_and_ramp_end_to_end(ramp_root, tmp_path, write_mode):
    """raw: views against the ideal ramp. jpg: FFCV's fast JPEG decoder reads red about one level (one source px
    here) darker, so views are checked against the stored image as FFCV decodes it, at the predicted points."""
    files = scan_image_folder(ramp_root).files
    beton = write_beton(ramp_root, tmp_path / "ramp.beton", jpeg_quality=95, write_mode=write_mode)
    stored = {i: read_stored_image(beton, i) for i in range(len(files))} if write_mode == "jpg" else None
    batches = list(ffcv_loader(beton, order="sequential"))
    for batch in batches:
        check_batch(batch, SPEC)
    for err in ramp_errors(batches, files, stored=stored):
        assert_ramp_agrees(err)
    with pytest.raises(AssertionError):
        assert_ramp_agrees(ramp_errors(batches, files, mirror=True, stored=stored)[0])


def test_recorded_geometry_reproduces_the_views(synthetic_root, raw_beton):
    files = scan_image_folder(synthetic_root / "train").files
    batch = next(iter(ffcv_loader(raw_beton, batch_size=8)))
    right, wrong = [], []
    for b in range(8):
        image = decode_rgb(open(files[int(batch["index"][b])], "rb").read())
        for v in ("1", "2"):
            crop = crop_from_affine(batch["geometry" + v][b].double().numpy(), SPEC.size)
            got = batch["view" + v][b].permute(1, 2, 0).float().numpy()
            rebuilt = render_view(image, crop, SPEC.size).astype(np.float32)
            right.append(np.abs(got - rebuilt).mean())
            wrong.append(np.abs(got[:, ::-1] - rebuilt).mean())
    assert max(right) < 0.5, right  # the same antialiased bilinear filter as the reference loader
    assert np.mean(wrong) > 5 * np.mean(right)


def test_same_seed_same_batches_and_epochs_differ(raw_beton):
    a, b = (list(ffcv_loader(raw_beton, seed=5)) for _ in range(2))
    for x, y in zip(a, b):
        for key in PAIR_BATCH:
            assert torch.equal(x[key], y[key]), key
    resumed = ffcv_loader(raw_beton, seed=5)
    resumed.set_epoch(0, 2)  # a resumed run: skips the first two batches, same views after
    assert [torch.equal(x["view2"], y["view2"]) for x, y in zip(resumed, a[2:])] == [True] * (len(a) - 2)
    other = ffcv_loader(raw_beton, seed=5)
    other.set_epoch(1)
    assert not torch.equal(next(iter(other))["geometry1"], a[0]["geometry1"])


def test_clear_errors(tmp_path, raw_beton, synthetic_root):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ffcv_loader(tmp_path / "missing.beton")
    with pytest.raises(ValueError, match="order="):
        ffcv_loader(raw_beton, order="shuffled")
    with pytest.raises(ValueError, match="reads a .beton"):
        ffcv_loader(synthetic_root / "train")


@pytest.mark.timeout(300)
def test_damaged_beton_stops_the_epoch_with_an_error_not_a_hang(synthetic_root, tmp_path):
    from ffcv.reader import Reader
    from densessl.pipeline.folder import BadImage
    beton = write_beton(synthetic_root / "train", tmp_path / "jpg.beton", workers=2)
    reader = Reader(str(beton))
    start = int(reader.metadata[f"f{reader.field_names.index('image')}"][5]["data_ptr"])
    with open(beton, "r+b") as f:  # bit rot in sample 5's entropy-coded data (its header stays readable)
        f.seek(start + 700)
        f.write(bytes(range(256)) * 3)
    assert read_stored_image(beton, 4).shape[2] == 3
    with pytest.raises(BadImage, match="sample 5"):
        read_stored_image(beton, 5)
    with pytest.raises(RuntimeError, match="loader thread stopped"):
        list(ffcv_loader(beton, order="sequential"))


@pytest.mark.parametrize("os_cache", [True, False])
def test_ffcv_leaves_numbas_shared_array_types_writable(raw_beton, os_cache):
    """FFCV 1.0.2 marked Numba's interned array types read-only (``nb.uint8[::1].mutable = False``), and every
    later kernel in the process that made such an array could no longer write to it (DALI's view cutter failed
    to compile in the suite). pipeline.ffcv builds those state types as its own."""
    import numba

    from densessl.pipeline.ffcv import FfcvLoader
    shared = [numba.types.uint8[::1], numba.types.uint8[:, ::1], numba.types.uint64[::1], numba.types.uint32[::1]]
    next(iter(FfcvLoader(raw_beton, SPEC.view_spec, batch_size=4, workers=2, os_cache=os_cache)))
    assert all(t.mutable for t in shared), [t for t in shared if not t.mutable]


def test_the_state_type_mend_is_for_the_tested_ffcv_release_only(monkeypatch):
    """``use_private_state_types`` is an explicit call gated on FFCV's version: another release's managers are
    left as they are, with a warning naming both releases, and the call is idempotent."""
    import densessl.pipeline.ffcv as ffcv_backend
    monkeypatch.setattr(ffcv_backend, "_MENDED", False)
    monkeypatch.setattr(ffcv_backend, "MENDED_FFCV", "0.0.1")
    managers = (ffcv_backend.OSCacheManager, ffcv_backend.ProcessCacheManager)
    before = [dict(m.__dict__) for m in managers]
    with pytest.warns(UserWarning, match=r"FFCV 1\.0\.2: its memory managers are used as they are.*FFCV 0\.0\.1"):
        ffcv_backend.use_private_state_types()
    assert [dict(m.__dict__) for m in managers] == before
    ffcv_backend.use_private_state_types()  # once per process: no second warning
