"""The data-folder index: every image of a data set as arrays, built once and reused by every rank, backend and
restart (``data_index``), and the screening verdicts that DALI needs, computed once per data set
(``screen_index``).

Why arrays: a Python list of 1.28M path strings costs ~150 MB, and every DataLoader worker that reads a string
writes its reference count, so over an epoch each worker copies the whole list (copy-on-write). Here the paths
are one bytes blob and its offsets (``Paths``): a worker reading a path writes no shared page. The arrays are
read into the process's memory rather than memory-mapped: forked workers share anonymous pages from the start,
while a shared file mapping is faulted in again by each worker as it reads (its PSS would grow by the blob's
share over an epoch). Measured in benchmarks/RESULTS.md, "ImageNet-scale folders".

Where: one file per data set in the index folder (``index_dir``: ``$DENSESSL_INDEX_DIR``, else
``$XDG_CACHE_HOME/densessl/index``, else ``~/.cache/densessl/index``; a folder densessl claims, see ``owned``), so
a read-only data folder works and every node of a cluster with a shared home finds it. The file is written to a
temporary name and renamed (atomic); one process writes while the others wait (a lock file whose writer keeps it
fresh; a lock left by a dead writer is taken over).

Fresh: the index records the modification time of every folder it walked (or of the file list); adding,
removing or renaming a file changes its folder's time, and the index is rebuilt on the next start. A file
rewritten in place keeps its folder's time: rebuild explicitly (``python -m densessl.pipeline.index DATA
--rebuild``).

Order: classes sorted, then file names sorted within each folder (torchvision's ``ImageFolder``), for the walk
and for a file list alike, so an index means the same file in every backend.
"""

from __future__ import annotations

import json
import operator
import os
import socket
import struct
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import owned
from .one_writer import one_writer

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
LIST_EXTENSION = ".JPEG"  # what a file-list line without an image extension names (ImageNet's train_cls.txt)
KIND = "data-index"  # the index folder's marker kind (owned)
MAGIC = b"densessl data index\n"
VERSION = 1
UNSCREENED, READABLE, BAD = 0, 1, 2  # verdicts


def default_index_dir() -> Path:
    if os.environ.get("DENSESSL_INDEX_DIR"):
        return Path(os.environ["DENSESSL_INDEX_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "densessl" / "index"


class Paths(Sequence):
    """A sequence of path strings held as one bytes blob and its offsets (numpy arrays, possibly memory-mapped):
    ``paths[i]`` builds the string on demand, so reading every path copies no shared page in a forked worker."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray, prefix: str = ""):
        self.blob, self.offsets, self.prefix = blob, offsets, prefix

    @classmethod
    def of(cls, strings, prefix: str = "") -> Paths:
        """Pack ``strings`` (each ends with a NUL in the blob: a path never holds one)."""
        blob = np.frombuffer(os.fsencode("\0".join(strings) + "\0"), np.uint8) if len(strings) else np.zeros(0, np.uint8)
        return cls(blob, np.concatenate([[0], np.flatnonzero(blob == 0) + 1]).astype(np.int64), prefix)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def relative(self, i) -> str:
        """The ``i``-th path without the prefix (the data root)."""
        n, i = len(self), operator.index(i)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} paths")
        i %= n
        return os.fsdecode(self.blob[self.offsets[i]:self.offsets[i + 1] - 1].tobytes())

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        return self.prefix + self.relative(i)


@dataclass(frozen=True)
class DataIndex:
    """The images of a data set, in the order every backend indexes them.

    ``sizes`` and ``mtimes`` (bytes, nanoseconds) are recorded when a file is screened (0 before); ``verdicts``
    are ``UNSCREENED``, ``READABLE`` or ``BAD``, with the reason of each bad file in ``reasons``. ``file`` is where
    the index is cached (None: built in memory only)."""

    root: Path
    paths: Paths
    labels: np.ndarray  # int64 class index per file
    classes: tuple[str, ...]
    source: dict  # what it was built from, and the folder (or list) times that make it fresh
    sizes: np.ndarray = None
    mtimes: np.ndarray = None
    verdicts: np.ndarray = None
    reasons: dict = field(default_factory=dict)
    build: str = ""  # one id per build: screening chunks belong to it
    file: Path | None = None

    def __post_init__(self):
        n = len(self.paths)
        for name, dtype in (("sizes", np.int64), ("mtimes", np.int64), ("verdicts", np.uint8)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, np.zeros(n, dtype))
        if not self.build:
            object.__setattr__(self, "build", uuid.uuid4().hex[:12])

    @property
    def files(self) -> Paths:
        return self.paths

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def screened(self) -> bool:
        return bool((self.verdicts != UNSCREENED).all())

    def stale(self) -> str | None:
        """Why the data changed since this index was built (cheap: one ``stat`` per folder), or None."""
        src = self.source
        if src["kind"] == "files":
            return None
        if src["kind"] == "list":
            try:
                st = os.stat(src["list"])
            except OSError:
                return f"the file list {src['list']} is gone"
            return None if [st.st_mtime_ns, st.st_size] == src["stamp"] else f"{src['list']} changed"
        for rel, stamp in zip(src["dirs"], src["stamps"]):
            try:
                if os.stat(self.root / rel).st_mtime_ns != stamp:
                    return f"{self.root / rel} changed"
            except OSError:
                return f"{self.root / rel} is gone"
        return None


# --- building -----------------------------------------------------------------------------------------------------

def scan_image_folder(root: str | os.PathLike) -> DataIndex:
    """Index ``root/<class>/<image>`` by walking it (no cache); fails with a message that says what is wrong.

    Links are followed, entering each real directory (device, inode) once, by the first path that reaches it in
    scan order: a data set may be assembled from links, while a link to an ancestor would otherwise list its
    images once per lap, and two such links per folder make the scan exponential."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist (expected ROOT/<class>/<image>.jpg)")
    root_stamp = os.stat(root).st_mtime_ns
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"data folder {root} has no class sub-folders (expected ROOT/<class>/<image>.jpg)")
    files, counts, dirs, stamps = [], [], [""], [root_stamp]
    visited = {_identity(root)}  # every class folder is claimed first: a link into one from another is not followed
    claimed = [_first_visit(root / cls, visited) for cls in classes]
    for label, cls in enumerate(classes):
        if not claimed[label]:
            counts.append(0)
            continue
        stack, found = [cls], 0
        while stack:
            rel = stack.pop()
            path = os.path.join(root, rel)
            dirs.append(rel)
            stamps.append(os.stat(path).st_mtime_ns)  # before the listing: a file added meanwhile makes it stale
            with os.scandir(path) as entries:
                entries = list(entries)
            subdirs = [e.name for e in entries if e.is_dir()]
            names = [e.name for e in entries if not e.is_dir()] if subdirs else [e.name for e in entries]
            names = [f"{rel}/{n}" for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS)]
            files += names
            found += len(names)
            subdirs = [f"{rel}/{d}" for d in sorted(subdirs) if _first_visit(os.path.join(path, d), visited)]
            stack += reversed(subdirs)  # depth first, in sorted order (os.walk's top-down order)
        counts.append(found)
    if not files:
        raise ValueError(f"data folder {root} has class folders but no {'/'.join(IMAGE_EXTENSIONS)} images")
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), counts)
    return DataIndex(root, Paths.of(files, f"{root}{os.sep}"), labels, tuple(classes),
                     {"kind": "folder", "dirs": dirs, "stamps": stamps})


def _labels_of(files: list[str], classes: list[str]) -> np.ndarray:
    number = {c: i for i, c in enumerate(classes)}
    return np.fromiter((number[f.split("/", 1)[0]] for f in files), np.int64, len(files))


def read_file_list(root: str | os.PathLike, file_list: str | os.PathLike) -> DataIndex:
    """Index the files a list names, relative to ``root``, one per line (``<class>/<name>[ <number>]``: ImageNet's
    ``train_cls.txt``; a name without a .jpg/.jpeg/.png extension gets ``.JPEG``), with no folder walk. The class
    is the first folder of each path; the order is the walk's (classes sorted, then paths)."""
    root, file_list = Path(root), Path(file_list)
    stamp = os.stat(file_list)
    entries = []
    with open(file_list, encoding="utf-8", errors="surrogateescape") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(None, 1)
            path = parts[0] if len(parts) == 2 and parts[1].lstrip("-").isdigit() else line
            if os.path.isabs(path) or "/" not in path.strip("/"):
                raise ValueError(f"{file_list}, line {number}: {path!r} is not <class>/<image> relative to {root}")
            if not path.lower().endswith(IMAGE_EXTENSIONS):
                path += LIST_EXTENSION
            cls, rest = path.split("/", 1)
            entries.append((cls, rest))
    if not entries:
        raise ValueError(f"{file_list} lists no images")
    entries.sort()
    classes = sorted({cls for cls, _ in entries})
    files = [f"{cls}/{rest}" for cls, rest in entries]
    return DataIndex(root, Paths.of(files, f"{root}{os.sep}"), _labels_of(files, classes), tuple(classes),
                     {"kind": "list", "list": str(file_list.resolve()), "stamp": [stamp.st_mtime_ns, stamp.st_size]})


def _identity(path) -> tuple[int, int]:
    st = os.stat(path)  # follows links: the directory a path leads to
    return st.st_dev, st.st_ino


def _first_visit(path, visited: set) -> bool:
    """Whether ``path`` leads to a directory not scanned yet (then it is marked scanned); else warn, once per
    link, that it is not followed."""
    try:
        key = _identity(path)
    except OSError:  # a dangling link or no permission: os.walk skips it as well
        return False
    if key in visited:
        warnings.warn(f"not following {path}: it leads to a folder already scanned (a symlink loop or a second "
                      "link to the same folder); its images are listed once")
        return False
    visited.add(key)
    return True


# --- the cached index -----------------------------------------------------------------------------------------------

def data_index(root: str | os.PathLike, file_list: str | os.PathLike | None = None,
               index_dir: str | os.PathLike | None = None, rebuild: bool = False) -> DataIndex:
    """The index of the ImageFolder ``root`` (or of the files ``file_list`` names under it): the cached one when it
    is fresh, else built (walked or read) and cached, by one process while the others wait. When the index folder
    cannot be written, the index is built in memory with a warning. ``rebuild`` builds it again in any case."""
    root = Path(root).absolute()
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist (expected ROOT/<class>/<image>.jpg)")
    build = (lambda: read_file_list(root, file_list)) if file_list else (lambda: scan_image_folder(root))
    folder = Path(index_dir) if index_dir else default_index_dir()
    try:
        owned.claim(folder, KIND, "data.index_dir")
    except OSError as err:
        warnings.warn(f"cannot write the data index to {folder} ({err}); building it in memory: set data.index_dir "
                      "(or DENSESSL_INDEX_DIR) to a writable folder")
        return build()
    path = folder / index_name(root, file_list)
    while True:
        if not rebuild and (index := _load_fresh(path)) is not None:
            return index
        with one_writer(path.with_name(path.name + ".lock")) as writing:
            if writing:
                if not rebuild and (index := _load_fresh(path)) is not None:  # written while this one waited
                    return index
                write_index(build(), path)
                return read_index(path)
        rebuild = False  # another process built it meanwhile


def index_of(data) -> DataIndex:
    """``data`` as an index: a ``DataIndex`` itself, an ImageFolder root through ``data_index`` (cached), a
    sequence of image paths in memory (label 0, no cache: each process screens such a list itself)."""
    if isinstance(data, DataIndex):
        return data
    if isinstance(data, (str, os.PathLike)):
        return data_index(data)
    if isinstance(data, Paths) and data.prefix == os.sep:
        paths = data
    else:  # absolute, and relative to the root folder like every other index
        paths = Paths.of([os.path.abspath(p)[1:] for p in data], os.sep)
    if len(paths) == 0:
        raise ValueError("the list of image files is empty")
    return DataIndex(Path(os.sep), paths, np.zeros(len(paths), np.int64), ("",), {"kind": "files"})


def index_name(root: Path, file_list) -> str:
    import hashlib

    key = os.path.realpath(root) + ("\0" + os.path.realpath(file_list) if file_list else "")
    return f"{root.name or 'root'}-{hashlib.sha1(os.fsencode(key)).hexdigest()[:16]}.idx"


def _load_fresh(path: Path) -> DataIndex | None:
    try:
        index = read_index(path)
    except FileNotFoundError:
        return None
    except ValueError as err:  # another version's index, or a damaged one: ours to replace
        print(f"rebuilding {path}: {err}", flush=True)
        return None
    why = index.stale()
    if why:
        print(f"rebuilding the data index {path}: {why}", flush=True)
        return None
    return index


def write_index(index: DataIndex, path: Path) -> None:
    """Write ``index`` to ``path`` atomically (a temporary name, then a rename). A file already there is replaced
    only when it is an index (our magic line), whatever else has that name is refused."""
    arrays = {"blob": index.paths.blob, "offsets": index.paths.offsets, "labels": index.labels,
              "sizes": index.sizes, "mtimes": index.mtimes, "verdicts": index.verdicts}
    layout, at = {}, 0
    for name, a in arrays.items():
        layout[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": at}
        at += -(-a.nbytes // 64) * 64
    header = json.dumps({"version": VERSION, "root": str(index.root), "classes": list(index.classes),
                         "source": index.source, "reasons": {str(k): v for k, v in index.reasons.items()},
                         "build": index.build, "arrays": layout}).encode()
    base = -(-(len(MAGIC) + 8 + len(header)) // 64) * 64
    if path.exists() and not _is_index(path):
        raise owned.NotOurs(f"{path} exists and is not a densessl data index; remove it or choose data.index_dir")
    tmp = path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", len(header)) + header)
        for name, a in arrays.items():
            f.seek(base + layout[name]["offset"])
            f.write(np.ascontiguousarray(a).tobytes())
        f.truncate(base + at)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _is_index(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def read_index(path: Path) -> DataIndex:
    """The index in ``path``; ``ValueError`` when it is not one this version reads."""
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise ValueError("not a densessl data index")
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    if header.get("version") != VERSION:
        raise ValueError(f"index version {header.get('version')}, this densessl reads {VERSION}")
    base = -(-(len(MAGIC) + 8 + length) // 64) * 64
    arrays = {}
    with open(path, "rb") as f:  # into this process's memory, not mapped: see the module docstring
        for name, spec in header["arrays"].items():
            shape, dtype = tuple(spec["shape"]), np.dtype(spec["dtype"])
            arrays[name] = np.fromfile(f, dtype, int(np.prod(shape)), offset=base + spec["offset"] - f.tell())
            arrays[name] = arrays[name].reshape(shape)
            arrays[name].flags.writeable = False
    root = Path(header["root"])
    return DataIndex(root, Paths(arrays["blob"], arrays["offsets"], f"{root}{os.sep}"), arrays["labels"],
                     tuple(header["classes"]), header["source"], arrays["sizes"], arrays["mtimes"],
                     arrays["verdicts"], {int(k): v for k, v in header["reasons"].items()}, header["build"], path)


def main(argv=None) -> None:
    """Build (or rebuild) a data set's index ahead of a run, and screen it for DALI: once, on one machine."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("data", help="the ImageFolder root (data.path)")
    p.add_argument("--file-list", default=None, help="its images, one per line, instead of a walk (data.file_list)")
    p.add_argument("--index-dir", default=None, help="where indexes are cached (data.index_dir; default "
                   f"{default_index_dir()})")
    p.add_argument("--rebuild", action="store_true", help="build it again even when the cached one is fresh")
    p.add_argument("--screen", action="store_true",
                   help="also screen every file, as the GPU-decoding backend does on its first start")
    args = p.parse_args(argv)
    index = data_index(args.data, args.file_list, args.index_dir, rebuild=args.rebuild)
    if args.screen:
        from .screening import screen_index
        index, _ = screen_index(index)
    bad = f", {len(index.reasons)} unreadable" if index.screened else ", not screened"
    print(f"{index.file}: {len(index):,} images in {len(index.classes):,} classes{bad}")


if __name__ == "__main__":
    main()
