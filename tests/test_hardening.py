"""Input hardening (issue 37, item 3): only the promised image formats are opened, the folder scan enters each
real directory once, an FFCV ``.beton`` cannot make the decoder allocate what its header claims, and
``derived.grid_flow`` broadcasts over leading dimensions as documented."""

import io
import os
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import EpsImagePlugin, Image

from densessl.pipeline.folder import BadImage, decode_rgb, read_first_readable
from densessl.pipeline.index import scan_image_folder
from densessl.pipeline.screening import screen_file


def _jpeg(path: Path, h: int = 32, w: int = 48, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(path, quality=90)
    return path


# --- formats -----------------------------------------------------------------------------------------------------

EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 32 32
%%EndComments
newpath 0 0 moveto 32 0 lineto 32 32 lineto closepath fill
showpage
%%EOF
"""


@pytest.fixture
def fake_gs(tmp_path, monkeypatch):
    """A ``gs`` first on PATH that leaves a marker file when anything runs it (PIL finds Ghostscript on PATH,
    and checks for it by running ``gs --version``); returns the marker's path."""
    bin_dir, marker = tmp_path / "bin", tmp_path / "gs-ran"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\necho \"$@\" >> '{marker}'\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # forget a Ghostscript found (or not) earlier
    return marker


def test_eps_named_jpg_is_a_bad_file_and_never_reaches_ghostscript(tmp_path, fake_gs):
    folder = tmp_path / "data" / "cls"
    folder.mkdir(parents=True)
    (folder / "a.jpg").write_bytes(EPS)
    _jpeg(folder / "b.jpg")
    files = scan_image_folder(tmp_path / "data").files
    log = tmp_path / "skipped.txt"
    with pytest.warns(UserWarning, match="a.jpg"):
        j, pixels = read_first_readable(files, 0, str(log))  # the reference loader's and FFCV writer's path
    assert j == 1 and pixels.shape == (32, 48, 3)
    assert log.read_text() == f"{files[0]}\tnot a JPEG or PNG image\n"
    assert not fake_gs.exists(), "Ghostscript was run on a data set file"
    with pytest.raises(BadImage, match="JPEG"):
        decode_rgb(EPS)
    assert screen_file(files[0]) is not None  # DALI's screening reports it too
    assert not fake_gs.exists(), "Ghostscript was run on a data set file"
    # the check means something: PIL left to choose a plugin runs Ghostscript on this file
    with pytest.raises(subprocess.CalledProcessError), Image.open(io.BytesIO(EPS)) as im:  # the fake gs fails
        im.load()
    assert fake_gs.exists()


def test_other_formats_pil_reads_are_bad_files(tmp_path):
    for fmt in ("BMP", "GIF", "TIFF", "WEBP"):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (10, 20, 30)).save(buf, fmt)
        with pytest.raises(BadImage):
            decode_rgb(buf.getvalue())
        (tmp_path / f"{fmt}.png").write_bytes(buf.getvalue())
        assert screen_file(str(tmp_path / f"{fmt}.png")) is not None, fmt
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(buf, "PNG")
    assert decode_rgb(buf.getvalue()).shape == (16, 16, 3)


# --- symlink loops -------------------------------------------------------------------------------------------------

def _loop_warnings(record, link: Path) -> int:
    return sum(f"following {link}:" in str(w.message) for w in record)


@pytest.mark.timeout(60)
def test_a_symlink_loop_lists_each_image_once_and_is_reported_once(tmp_path):
    root = tmp_path / "data"
    sub = root / "cls" / "sub"
    sub.mkdir(parents=True)
    _jpeg(root / "cls" / "x.jpg")
    _jpeg(sub / "y.jpg")
    (sub / "up").symlink_to("..")  # back to cls: without care, each lap lists both images again
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        folder = scan_image_folder(root)
    assert sorted(Path(f).relative_to(root).as_posix() for f in folder.files) == ["cls/sub/y.jpg", "cls/x.jpg"]
    assert _loop_warnings(record, sub / "up") == 1


@pytest.mark.timeout(60)
def test_two_loops_per_folder_end_and_a_second_way_in_is_not_followed(tmp_path):
    root = tmp_path / "data"
    a, b = root / "a", root / "b"
    (a / "s").mkdir(parents=True)
    b.mkdir()
    for d in (a, a / "s", b):
        _jpeg(d / "i.jpg")
        (d / "loop1").symlink_to(".")
        (d / "loop2").symlink_to("..")
    (a / "s" / "loop3").symlink_to(root)  # up to the data root
    (b / "again").symlink_to(a / "s")  # a second way into a folder another class holds
    (a / "s" / "other").symlink_to(b)  # into a class scanned later: its images keep their own class
    (root / "c").symlink_to(a)  # a class that is another class's folder: listed once, under the first
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        folder = scan_image_folder(root)
    names = [Path(f).relative_to(root).as_posix() for f in folder.files]
    assert names == ["a/i.jpg", "a/s/i.jpg", "b/i.jpg"] and folder.labels.tolist() == [0, 0, 1]
    assert folder.classes == ("a", "b", "c")
    for link in (a / "loop1", a / "loop2", a / "s" / "loop1", a / "s" / "loop2", a / "s" / "loop3",
                 a / "s" / "other", b / "loop1", b / "loop2", b / "again", root / "c"):
        assert _loop_warnings(record, link) == 1, link


# --- FFCV ---------------------------------------------------------------------------------------------------------

def _needs_ffcv():
    if os.environ.get("DENSESSL_REQUIRE_BACKENDS"):
        import ffcv  # noqa: F401  (`make test` installs FFCV: a missing one is a failure, not a skip)
    else:
        pytest.importorskip("ffcv")


def _image_meta(sizes):
    _needs_ffcv()
    from ffcv.fields import RGBImageField
    meta = np.zeros(len(sizes), RGBImageField().metadata_type)
    meta["height"], meta["width"] = np.asarray(sizes).T
    return meta


def _declared(decoder_meta):
    from ffcv.pipeline.state import State

    from densessl.pipeline import PairSpec
    from densessl.pipeline.ffcv import ViewsDecoder
    decoder = ViewsDecoder(PairSpec(size=(32, 32), num_matches=4, min_matches=4).view_spec)
    decoder.metadata = decoder_meta
    _, (_, scratch, _) = decoder.declare_state_and_memory(State(False, torch.device("cpu"), (0,), np.uint8))
    return scratch.shape


def test_ffcv_scratch_is_the_largest_image_not_tallest_by_widest():
    assert _declared(_image_meta([(16000, 100), (100, 16000), (50, 50)])) == (16000 * 100 * 3,)  # not 768 MB
    assert _declared(_image_meta([(16384, 8192)])) == (3 << 27,)  # MAX_PIXELS itself is allowed
    for sizes, declared in (([(16384, 8193)], "8193x16384"), ([(5, 5), (0, 20)], "20x0")):
        with pytest.raises(ValueError, match=f"the .beton: sample {len(sizes) - 1} declares a {declared} image"):
            _declared(_image_meta(sizes))


def _patch_declared_size(beton: Path, sample: int, h: int, w: int) -> None:
    """Rewrite sample ``sample``'s image height and width in the .beton's metadata table, in place."""
    from ffcv.reader import Reader
    from ffcv.types import HeaderType
    reader = Reader(str(beton))
    table = HeaderType.itemsize + reader.field_descriptors.nbytes  # where FFCV's Reader reads the metadata from
    column = f"f{reader.field_names.index('image')}"
    field_offset = reader.metadata_type.fields[column][1]
    image_type = reader.metadata_type[column]
    with open(beton, "r+b") as f:
        for key, value in (("height", h), ("width", w)):
            f.seek(table + sample * reader.metadata_type.itemsize + field_offset + image_type.fields[key][1])
            f.write(np.uint16(value).tobytes())
    patched = Reader(str(beton)).metadata[column][sample]
    assert (int(patched["height"]), int(patched["width"])) == (h, w)


@pytest.mark.timeout(300)
def test_a_beton_declaring_an_image_over_max_pixels_is_refused_in_one_line(tmp_path):
    _needs_ffcv()
    from densessl.pipeline import PairSpec, build_loader
    from densessl.pipeline.ffcv import write_beton
    from densessl.pipeline.folder import MAX_PIXELS
    (tmp_path / "data" / "cls").mkdir(parents=True)
    for i in range(4):
        _jpeg(tmp_path / "data" / "cls" / f"{i}.jpg", seed=i)
    beton = write_beton(tmp_path / "data", tmp_path / "x.beton", workers=1)
    spec = PairSpec(size=(32, 32), num_matches=4, min_matches=4)
    build_loader("ffcv", beton, spec, batch_size=2, workers=1)  # as written: accepted
    _patch_declared_size(beton, 2, 65535, 65535)
    assert 65535 * 65535 > MAX_PIXELS
    with pytest.raises(ValueError) as err:
        build_loader("ffcv", beton, spec, batch_size=2, workers=1)
    message = str(err.value)
    assert "\n" not in message and str(beton) in message and "65535x65535" in message and "MAX_PIXELS" in message
    from densessl.pipeline.ffcv import read_stored_image
    for sample in (2, 1):  # the file is damaged: no sample of it is read
        with pytest.raises(ValueError, match="sample 2 declares a 65535x65535 image"):
            read_stored_image(beton, sample)


# --- grid_flow broadcasting ---------------------------------------------------------------------------------------

def _affines(gen, *shape):
    """Random crop-like affines [*shape, 2, 3] (scales 0.5..2, some flipped, shifted)."""
    scale = 0.5 + 1.5 * torch.rand(*shape, 2, generator=gen, dtype=torch.float64)
    scale[..., 0] *= torch.where(torch.rand(*shape, generator=gen) < 0.5, -1.0, 1.0).double()
    shift = 40 * torch.rand(*shape, 2, generator=gen, dtype=torch.float64) - 20
    a = torch.zeros(*shape, 2, 3, dtype=torch.float64)
    a[..., 0, 0], a[..., 1, 1], a[..., :, 2] = scale[..., 0], scale[..., 1], shift
    return a


def test_grid_flow_broadcasts_over_leading_dimensions():
    from densessl.pipeline.derived import grid_flow
    gen = torch.Generator().manual_seed(0)
    a_local, a_global = _affines(gen, 3, 4), _affines(gen, 3, 2)  # [B, 4 locals], [B, 2 globals]
    size_l, size_g = (32, 32), (64, 48)
    flows = grid_flow(a_local[:, :, None], size_l, a_global[:, None], size_g)
    assert flows.shape == (3, 4, 2, 8, 8, 2)
    for i in range(4):
        for j in range(2):
            torch.testing.assert_close(flows[:, i, j], grid_flow(a_local[:, i], size_l, a_global[:, j], size_g),
                                       equal_nan=True)
    assert torch.isfinite(flows).any() and torch.isnan(flows).any()
    flipped = grid_flow(a_global[:, None], size_g, a_local[:, :, None], size_l)  # the broadcast on the other side
    assert flipped.shape == (3, 4, 2, 16, 12, 2)
