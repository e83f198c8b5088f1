"""The data-folder index (``pipeline.index``) and screening (``pipeline.screening``): built once and reused by
every process, one writer at a time, fresh when the folder changes, paths as arrays (a worker's memory stays
flat), and screening verdicts equal to those of the screening it replaced."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from corpus import write_corpus, write_screening_extras
from PIL import Image

from densessl.pipeline import PairSpec, build_loader, owned
from densessl.pipeline.index import (KIND, DataIndex, data_index, index_name, read_file_list, read_index,
                                     scan_image_folder)
from densessl.pipeline.screening import screen_index

FROZEN = Path(__file__).resolve().parent / "frozen" / "screening.json"


def _folder(root: Path, classes: int = 3, per_class: int = 4, links: int = 0) -> Path:
    """ROOT/c<k>/<i>.jpg: small JPEGs, then ``links`` more per class, hard links to them."""
    for k in range(classes):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((24, 32, 3), 40 * k + 9 * i, np.uint8)).save(root / f"c{k}" / f"{i:03d}.jpg")
        for i in range(links):
            os.link(root / f"c{k}" / f"{i % per_class:03d}.jpg", root / f"c{k}" / f"link{i:06d}.jpg")
    return root


def _in_processes(code: str, n: int, env: dict | None = None) -> list[dict]:
    """Run ``code`` (which prints one JSON line) in ``n`` processes started together; their outputs."""
    start = time.time() + 2.0  # every process waits for the same moment, after its imports
    script = f"import time, json\ntime.sleep(max(0.0, {start} - time.time()))\n" + textwrap.dedent(code)
    procs = [subprocess.Popen([sys.executable, "-c", script.replace("RANK", str(r))], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
             for r in range(n)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def test_the_index_is_built_once_reused_by_other_processes_and_rebuilt_when_a_file_is_added(tmp_path):
    root, cache = _folder(tmp_path / "data"), tmp_path / "cache"
    code = f"""
        from densessl.pipeline.index import data_index
        index = data_index({str(root)!r}, index_dir={str(cache)!r})
        print(json.dumps({{"build": index.build, "files": len(index)}}))
    """
    first, restarted = _in_processes(code, 1) + _in_processes(code, 1)  # a rank, then a requeued job
    assert first == restarted and first["files"] == 12
    assert owned.kind(cache) == KIND and [p.name for p in cache.glob("*.idx")] == [index_name(root, None)]
    time.sleep(0.01)
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(root / "c1" / "new.jpg")
    rebuilt = _in_processes(code, 1)[0]
    assert rebuilt["build"] != first["build"] and rebuilt["files"] == 13
    index = data_index(root, index_dir=cache)
    assert index.build == rebuilt["build"] and str(root / "c1" / "new.jpg") in list(index.paths)


def test_two_processes_building_at_once_get_one_index(tmp_path):
    root, cache = _folder(tmp_path / "data", links=3000), tmp_path / "cache"  # a walk of ~9,000 files
    code = f"""
        from densessl.pipeline.index import data_index
        print(json.dumps({{"build": data_index({str(root)!r}, index_dir={str(cache)!r}).build}}))
    """
    a, b = _in_processes(code, 2)
    assert a == b
    assert read_index(cache / index_name(root, None)).build == a["build"]
    assert sorted(p.name for p in cache.iterdir()) == [".densessl", index_name(root, None)]  # no lock, no temp


def test_an_abandoned_lock_is_taken_over_and_a_foreign_index_folder_is_refused(tmp_path):
    root, cache = _folder(tmp_path / "data"), tmp_path / "cache"
    owned.claim(cache, KIND, "data.index_dir")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = cache / (index_name(root, None) + ".lock")
    lock.write_text(f"{os.uname().nodename} {dead.stdout.strip()}\n")  # a writer that died
    assert len(data_index(root, index_dir=cache)) == 12 and not lock.exists()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(owned.NotOurs, match="data.index_dir=.*not written by densessl"):
        data_index(root, index_dir=theirs)
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"]


def test_a_file_list_gives_the_walks_index_without_walking(tmp_path):
    root = _folder(tmp_path / "data")
    (root / "c0" / "notes.txt").write_text("not an image")
    walked = scan_image_folder(root)
    lines = [f"{p.relative_to(root).with_suffix('').as_posix()} {n}" for n, p in
             enumerate(sorted(Path(f) for f in walked.paths)[::-1], 1)]  # train_cls.txt: no extension, any order
    listed_file = tmp_path / "train_cls.txt"
    listed_file.write_text("\n".join(lines).replace(".jpg", "") + "\n")
    for p in root.rglob("*.jpg"):
        p.rename(p.with_suffix(".JPEG"))  # as ImageNet names its files
    walked = scan_image_folder(root)
    listed = read_file_list(root, listed_file)
    assert list(listed.paths) == list(walked.paths) and listed.classes == walked.classes
    np.testing.assert_array_equal(listed.labels, walked.labels)
    cached = data_index(root, listed_file, index_dir=tmp_path / "cache")
    assert list(cached.paths) == list(walked.paths) and cached.stale() is None
    listed_file.write_text("c0/000\n")
    assert "changed" in cached.stale()
    bad = tmp_path / "bad.txt"
    bad.write_text("000.JPEG 1\n")
    with pytest.raises(ValueError, match="line 1: '000.JPEG' is not <class>/<image>"):
        read_file_list(root, bad)


def test_worker_memory_stays_flat_when_every_path_is_read(tmp_path):
    from densessl.benchmarks.scale import touched

    root = _folder(tmp_path / "data", classes=2, per_class=4, links=100_000)  # 200,008 paths: ~22 MiB as str
    loader = build_loader("torch", data_index(root, index_dir=tmp_path / "cache"), PairSpec(), batch_size=2,
                          workers=0)
    paths = loader.engine.loader.dataset.files
    grown = touched(paths, workers=2)
    assert grown["forked_growth_per_worker_mib"] < 5, grown
    listed = touched(list(paths), workers=2)  # the list of strings it replaced: each worker copies it
    assert listed["forked_growth_per_worker_mib"] > 10 + grown["forked_growth_per_worker_mib"], listed


def test_screening_verdicts_equal_the_screening_it_replaced(tmp_path):
    """``frozen/screening.json``: what ``folder.screen_file`` of commit 4b11bf2 (64 KB from the start, 4 KB from
    the end of every file) said of each file of this corpus."""
    root = write_screening_extras(write_corpus(tmp_path / "corpus"))
    index, keep = screen_index(data_index(root, index_dir=tmp_path / "cache"))
    said = {Path(index.paths[i]).relative_to(root).as_posix(): index.reasons.get(i) for i in range(len(index))}
    assert said == json.loads(FROZEN.read_text())
    assert len(keep) == sum(v is None for v in said.values())
    cached = data_index(root, index_dir=tmp_path / "cache")
    assert cached.screened and cached.reasons == index.reasons and (cached.sizes > 0).sum() == len(index) - 1


def test_ranks_share_the_first_screening_and_every_later_start_reads_it(tmp_path):
    root, cache = write_corpus(tmp_path / "corpus"), tmp_path / "cache"
    data_index(root, index_dir=cache)
    code = f"""
        import contextlib, io
        from densessl.pipeline import screening
        from densessl.pipeline.index import data_index
        screening.CHUNK = 4  # a chunk per four files
        said = io.StringIO()
        with contextlib.redirect_stdout(said):
            index, keep = screening.screen_index(data_index({str(root)!r}, index_dir={str(cache)!r}), rank=RANK,
                                                 world_size=2)
        print(json.dumps({{"keep": keep.tolist(), "screened": said.getvalue().count("screened chunk")}}))
    """
    a, b = _in_processes(code, 2)
    assert a["keep"] == b["keep"]
    assert a["screened"] + b["screened"] == -(-len(data_index(root, index_dir=cache)) // 4)  # each chunk once
    index = data_index(root, index_dir=cache)
    assert index.screened and np.flatnonzero(index.verdicts == 1).tolist() == a["keep"]
    assert sorted(p.name for p in cache.iterdir()) == [".densessl", index_name(root, None)]


def test_a_list_of_files_is_an_index_in_memory(synthetic_root):
    files = list(scan_image_folder(synthetic_root / "train").paths)[:5]
    from densessl.pipeline.index import index_of
    index = index_of(files)
    assert isinstance(index, DataIndex) and list(index.paths) == files and index.file is None
