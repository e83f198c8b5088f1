"""The one place that names loader backends: ``build_loader`` (for the trainer, benchmarks and users), the
``data`` section of the training configuration (``DataConfig``) with every rule about backends (what each needs
installed, the orders each supports), and data preparation: the embedded set's generation, FFCV's ``.beton``,
and the fixed preview images the trainer shows in TensorBoard."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from .contract import PairLoader, ViewLoader
from .folder import read_first_readable
from .index import DataIndex, data_index, index_of
from .geometry import Crop
from .loader import render_view
from .views import PairSpec, ViewSpec

BACKENDS = ("torch", "dali", "ffcv")
ORDERS = {"torch": ("random", "sequential"), "dali": ("random",), "ffcv": ("random", "quasi_random", "sequential")}
INSTALL_HINTS = {
    "dali": ("nvidia.dali", "backend=dali needs NVIDIA DALI: pip install -e '.[dali]' (nvidia-dali-cuda130)"),
    "ffcv": ("ffcv", "backend=ffcv needs FFCV 1.0.2: apt-get install libturbojpeg0-dev libopencv-dev pkg-config, "
                     "then pip install -e '.[ffcv]' (or run make setup)"),
}


def check_backend(backend: str, order: str = "random", world_size: int = 1) -> None:
    """The rules about backends and their orders, for ``DataConfig`` and ``build_loader`` alike."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: choose one of {', '.join(BACKENDS)}")
    if order not in ORDERS[backend]:
        raise ValueError(f"order={order!r} is not available with backend={backend}: choose "
                         f"{' or '.join(ORDERS[backend])}")
    if order == "quasi_random" and world_size > 1:
        raise ValueError("order=quasi_random is not available with several processes in FFCV 1.0.2: use "
                         "order=random")


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are read: the ``data`` section of the training configuration.

    ``path`` is an ImageFolder root, ``synthetic`` for the embedded set (generated into ``synthetic_dir``), or a
    ``.beton`` (``backend=ffcv``); an ImageFolder given to FFCV is written to a ``.beton`` once (``prepare``).
    An ImageFolder is read through its index (``pipeline.index``), cached in ``index_dir`` (default:
    ``$DENSESSL_INDEX_DIR`` or ``~/.cache/densessl/index``) and built from ``file_list`` (paths relative to
    ``path``, as ImageNet's ``train_cls.txt``) instead of a folder walk when one is given."""

    path: str = "synthetic"
    synthetic_dir: str = "data/synthetic"
    backend: str = "torch"  # torch (reference CPU loader), dali (GPU decode with a GPU, else CPU) or ffcv
    workers: int = 8  # loader processes or threads per rank
    order: str = "random"  # random; sequential (torch, ffcv); quasi_random (ffcv: data larger than RAM, 1 process)
    max_bad_images: int = 100  # unreadable files are skipped and listed in RUN/skipped.txt; more aborts the run
    file_list: str = ""  # the images of path, one per line, instead of a folder walk
    index_dir: str = ""  # where the data index is cached ("": $DENSESSL_INDEX_DIR or ~/.cache/densessl/index)

    legacy: ClassVar[dict[str, str]] = {"data": "path", "ffcv_order": "order"}

    def __post_init__(self):
        check_backend(self.backend, self.order)
        for name in ("workers", "max_bad_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")

    def check(self, world_size: int = 1) -> None:
        """What can only be checked on this machine: the backend is installed, the data is there, and the order
        works with ``world_size`` processes. One-line ``ValueError``s naming the key."""
        check_backend(self.backend, self.order, world_size)
        if self.backend in INSTALL_HINTS:
            module, hint = INSTALL_HINTS[self.backend]
            if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
                raise ValueError(hint)
        if self.path.endswith(".beton"):
            if self.backend != "ffcv":
                raise ValueError(f"path={self.path!r} is an FFCV .beton: set backend=ffcv")
            if not Path(self.path).is_file():
                raise ValueError(f"path={self.path!r}: no such file")
        elif self.path != "synthetic" and not Path(self.path).is_dir():
            raise ValueError(f"path={self.path!r}: no such folder")
        if self.file_list and (self.path == "synthetic" or self.path.endswith(".beton")):
            raise ValueError(f"file_list={self.file_list!r} names images of an ImageFolder: set path to its folder")
        if self.file_list and not Path(self.file_list).is_file():
            raise ValueError(f"file_list={self.file_list!r}: no such file")

    def prepare(self, work_dir: str | Path, write: bool = True, progress: bool = True) -> Path:
        """What ``build_loader`` reads for this data: the ImageFolder, or ``work_dir/train.beton`` written from it
        once for FFCV (for ImageNet, write it ahead: python -m densessl.pipeline.ffcv); the embedded set is
        generated first. ``write=False`` (ranks other than 0) only names the path; wait for the writer, then
        build the loader. Files the ``.beton`` writer skipped join ``work_dir/skipped.txt``."""
        root = Path(self.path)
        if self.path == "synthetic":
            if write:
                from .synthetic import generate
                generate(self.synthetic_dir, progress=progress, option="data.synthetic_dir")
            root = Path(self.synthetic_dir) / "train"
        if self.backend == "ffcv" and root.suffix != ".beton":
            beton = Path(work_dir) / "train.beton"
            if write and not beton.is_file():
                from .ffcv import write_beton
                print(f"writing {beton} from {root} (once; pass data.path=<file>.beton to reuse one)", flush=True)
                partial = beton.with_suffix(".partial")
                partial.unlink(missing_ok=True)  # an interrupted write's, in this run's own folder (run_folder)
                write_beton(self.source(root), partial, workers=self.workers,
                            max_bad_images=self.max_bad_images).rename(beton)
                bad = partial.with_name(partial.name + ".skipped.txt")
                if bad.exists():  # the writer's list joins the run's
                    with open(Path(work_dir) / "skipped.txt", "a") as f:
                        f.write(bad.read_text())
            root = beton
        return root

    def source(self, root: str | Path) -> DataIndex | Path:
        """What ``build_loader`` reads from the path ``prepare`` returned: a ``.beton``, or the ImageFolder's index
        (cached: built once per data set, by one process while the others wait)."""
        root = Path(root)
        if root.suffix == ".beton":
            return root
        return data_index(root, self.file_list or None, self.index_dir or None)


def preview_images(data: str | Path | DataIndex, n: int, size: int) -> torch.Tensor:
    """``n`` images spread over ``data`` (an ImageFolder, its index, or a ``.beton``), centre-cropped square and
    resized to ``size``: uint8 ``[n, 3, size, size]``, the same for every run and resume on this data (unreadable
    files are replaced by their readable neighbours)."""
    if not isinstance(data, DataIndex) and Path(data).suffix == ".beton":
        from ffcv.reader import Reader

        from .ffcv import read_stored_image
        count = Reader(str(data)).num_samples
        read = lambda i: read_stored_image(data, i)  # noqa: E731
    else:
        files = index_of(data).paths
        count = len(files)
        read = lambda i: read_first_readable(files, i, warn=False)[1]  # noqa: E731
    out = []
    for i in np.linspace(0, count - 1, min(n, count)).astype(int):
        pixels = read(int(i))
        side = min(pixels.shape[:2])
        crop = Crop((pixels.shape[0] - side) // 2, (pixels.shape[1] - side) // 2, side, side, False)
        out.append(torch.from_numpy(render_view(pixels, crop, (size, size))).permute(2, 0, 1))
    return torch.stack(out)


def build_loader(backend: str, data, spec: PairSpec | ViewSpec = PairSpec(), *, batch_size: int, workers: int = 2,
                 seed: int = 0, rank: int = 0, world_size: int = 1, device=None, state: dict | None = None,
                 skip_log: str | None = None, order: str = "random", drop_last: bool = True) -> ViewLoader:
    """A loader that yields the batch (``contract.BATCH``) of ``spec``'s views on every backend; for a
    ``PairSpec``, the pair batch (``contract.PAIR_BATCH``: ``as_pair`` of the same batch).

    backend    ``torch`` (reference: DataLoader workers), ``dali`` (GPU decode when ``device`` is a GPU, else
               CPU) or ``ffcv``
    data       an ImageFolder root (read through its cached index, ``pipeline.index.data_index``), a
               ``DataIndex``, or a list of image files (``torch``, ``dali``); a ``.beton`` (``ffcv``)
    spec       a ``ViewSpec`` (groups of views and their rules), or a preset: ``PairSpec``, ``MultiCropViews``
    batch_size per rank; ``workers``: loader processes or threads
    seed       every sample, view and match follows from it (and ``rank`` / ``world_size`` for the shard)
    device     where the model is (``torch.device``, ``"cuda:0"``, a GPU index, or None for the CPU): DALI
               decodes there, the reference loader pins memory for it
    state      a ``state_dict()`` of an earlier loader over the same data: continue exactly there
    skip_log   file that lists unreadable images replaced or left out (``torch``, ``dali``)
    order      ``random``; ``sequential`` (``torch``, ``ffcv``: evaluation); ``quasi_random`` (``ffcv``)
    """
    check_backend(backend, order, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if batch_size < 1 or workers < 0:
        raise ValueError(f"batch_size={batch_size} must be >= 1 and workers={workers} >= 0")
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cpu")
    views = spec.view_spec
    if backend == "ffcv":
        if not isinstance(data, (str, Path)) or Path(data).suffix != ".beton":
            raise ValueError(f"backend=ffcv reads a .beton, not {data!r}: write one with "
                             "python -m densessl.pipeline.ffcv DIR OUT.beton")
        from .ffcv import FfcvLoader
        loader = FfcvLoader(data, views, batch_size, max(1, workers), seed, order=order,
                            distributed=world_size > 1, drop_last=drop_last, state=state)
    else:
        index = index_of(data)
        if backend == "dali":
            from .dali import DaliLoader
            from .screening import screen_index
            index, keep = screen_index(index, skip_log, rank, world_size)  # DALI's decoder aborts on a broken file
            loader = DaliLoader(index, keep, views, batch_size, max(1, workers),
                                (device.index or 0) if device.type == "cuda" else None, seed, rank, world_size,
                                drop_last, state=state)
        else:
            from .loader import ReferenceLoader
            loader = ReferenceLoader(index.paths, views, batch_size, workers, seed, rank, world_size,
                                     shuffle=order == "random", drop_last=drop_last,
                                     pin_memory=device.type == "cuda", skip_log=skip_log, state=state)
    if len(loader) == 0:
        raise ValueError(f"the data gives each of {world_size} rank(s) fewer than one batch of {batch_size}; "
                         "lower batch_size or use more data")
    return PairLoader(loader, spec) if isinstance(spec, PairSpec) else loader
