"""``build_loader``: the one way to make a view-pair loader, for every backend (trainer, benchmarks, users)."""

from __future__ import annotations

from pathlib import Path

import torch

from .contract import PairSpec, ViewPairLoader
from .folder import scan_image_folder

BACKENDS = ("torch", "dali", "ffcv")
ORDERS = {"torch": ("random", "sequential"), "dali": ("random",), "ffcv": ("random", "quasi_random", "sequential")}


def build_loader(backend: str, data, spec: PairSpec = PairSpec(), *, batch_size: int, workers: int = 2,
                 seed: int = 0, rank: int = 0, world_size: int = 1, device=None, state: dict | None = None,
                 skip_log: str | None = None, order: str = "random", drop_last: bool = True) -> ViewPairLoader:
    """A loader that yields the batch contract (``contract.BATCH``) for ``spec``.

    backend    ``torch`` (reference: DataLoader workers), ``dali`` (GPU decode when ``device`` is a GPU, else
               CPU) or ``ffcv``
    data       an ImageFolder root or a list of image files (``torch``, ``dali``), a ``.beton`` (``ffcv``)
    batch_size per rank; ``workers``: loader processes or threads
    seed       every sample, view and match follows from it (and ``rank`` / ``world_size`` for the shard)
    device     where the model is (``torch.device``, ``"cuda:0"``, a GPU index, or None for the CPU): DALI
               decodes there, the reference loader pins memory for it
    state      a ``state_dict()`` of an earlier loader over the same data: continue exactly there
    skip_log   file that lists unreadable images replaced or left out (``torch``, ``dali``)
    order      ``random``; ``sequential`` (``torch``, ``ffcv``: evaluation); ``quasi_random`` (``ffcv``)
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: choose one of {', '.join(BACKENDS)}")
    if order not in ORDERS[backend]:
        raise ValueError(f"order={order!r} is not available with backend={backend}: choose "
                         f"{' or '.join(ORDERS[backend])}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if batch_size < 1 or workers < 0:
        raise ValueError(f"batch_size={batch_size} must be >= 1 and workers={workers} >= 0")
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cpu")
    if backend == "ffcv":
        if isinstance(data, (list, tuple)) or Path(data).suffix != ".beton":
            raise ValueError(f"backend=ffcv reads a .beton, not {data!r}: write one with "
                             "python -m densessl.pipeline.ffcv DIR OUT.beton")
        from .ffcv import FfcvViewPairLoader
        loader = FfcvViewPairLoader(data, spec, batch_size, max(1, workers), seed, order=order,
                                    distributed=world_size > 1, drop_last=drop_last, state=state)
    else:
        files = list(data) if isinstance(data, (list, tuple)) else scan_image_folder(data).files
        if backend == "dali":
            from .dali import DaliViewPairLoader
            loader = DaliViewPairLoader(files, spec, batch_size, max(1, workers),
                                        (device.index or 0) if device.type == "cuda" else None, seed, rank,
                                        world_size, drop_last, skip_log=skip_log, state=state)
        else:
            from .loader import ReferenceLoader
            loader = ReferenceLoader(files, spec, batch_size, workers, seed, rank, world_size,
                                     shuffle=order == "random", drop_last=drop_last,
                                     pin_memory=device.type == "cuda", skip_log=skip_log, state=state)
    if len(loader) == 0:
        raise ValueError(f"the data gives each of {world_size} rank(s) fewer than one batch of {batch_size}; "
                         "lower batch_size or use more data")
    return loader
