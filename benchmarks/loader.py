"""Loader throughput: the reference view-pair loader beside a naive torchvision baseline and the decode-only
ceiling of the same decoder, on the same files, workers and batch size, in one run.

    python -m densessl.benchmarks.loader --data DIR|synthetic [--backend torch,dali,ffcv] [--workers 2] [--batch 32]
                                [--epochs 2] [--reps 3]

``synthetic`` writes (once) an embedded-style set at ImageNet-like resolution (500x375) under data/. With
``ffcv``, the files are written (once) to a .beton beside them, and stock FFCV with two decoder pipelines on the
same .beton is timed too.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as F

from densessl.pipeline import PairSpec, build_loader
from densessl.pipeline.folder import decode_rgb
from densessl.pipeline.index import scan_image_folder
from densessl.pipeline.synthetic import SyntheticConfig, generate

from .common import machine, time_loader


class DecodeOnly(Dataset):
    """Read + decode with the loader's decoder and nothing else: the ceiling for a decode-once loader."""

    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with open(self.files[i], "rb") as f:
            return decode_rgb(f.read()).shape[0]


class NaiveTwoView(Dataset):
    """What one writes without this project: PIL decode, torchvision RandomResizedCrop + flip twice, and the
    correspondence recomputed per sample in numpy, redrawing views until 32 cells match."""

    def __init__(self, files, size=224, stride=4, k=32):
        self.files, self.size, self.stride, self.k = files, size, stride, k
        g = (np.mgrid[0: size // stride, 0: size // stride] + 0.5) * stride
        self.centres = np.stack([g[1].ravel(), g[0].ravel()], -1)  # (x, y) view-pixel centres

    def __len__(self):
        return len(self.files)

    def _view(self, im):
        i, j, h, w = RandomResizedCrop.get_params(im, scale=[0.2, 1.0], ratio=[3 / 4, 4 / 3])
        flip = bool(torch.rand(1) < 0.5)
        v = F.resized_crop(im, i, j, h, w, [self.size, self.size], antialias=True)
        return F.pil_to_tensor(F.hflip(v) if flip else v), (i, j, h, w, flip)

    def _to_source(self, p, xy):
        i, j, h, w, flip = p
        x = xy[:, 0] if not flip else self.size - xy[:, 0]
        return np.stack([j + x * w / self.size, i + xy[:, 1] * h / self.size], -1)

    def __getitem__(self, idx):
        im = Image.open(self.files[idx]).convert("RGB")
        while True:
            (v1, p1), (v2, p2) = self._view(im), self._view(im)
            src = self._to_source(p1, self.centres)
            i, j, h, w, flip = p2
            x2 = (src[:, 0] - j) * self.size / w
            x2 = self.size - x2 if flip else x2
            y2 = (src[:, 1] - i) * self.size / h
            valid = np.flatnonzero((x2 >= 0) & (x2 < self.size) & (y2 >= 0) & (y2 < self.size))
            if len(valid) >= self.k:
                break
        pick = np.random.choice(valid, self.k, replace=False)
        g = self.size // self.stride
        m2 = (y2[pick] // self.stride).astype(np.int64) * g + (x2[pick] // self.stride).astype(np.int64)
        return v1, v2, torch.from_numpy(np.stack([pick, m2], -1)), idx


def decoder_rates(files, limit=200) -> dict[str, float]:
    """Single-core decode rates of the candidate decoders on the same files: why decode_rgb uses simplejpeg."""
    import io
    import time

    import simplejpeg
    from torchvision.io import decode_image

    blobs = [open(f, "rb").read() for f in files[:limit]]
    candidates = {
        "simplejpeg": lambda b: simplejpeg.decode_jpeg(b, colorspace="RGB"),
        "PIL": lambda b: np.asarray(Image.open(io.BytesIO(b)).convert("RGB")),
        "torchvision.io": lambda b: decode_image(torch.frombuffer(b, dtype=torch.uint8)),
    }
    rates = {}
    for name, fn in candidates.items():
        fn(blobs[0])
        start = time.perf_counter()
        for b in blobs:
            fn(b)
        rates[name] = len(blobs) / (time.perf_counter() - start)
    return rates


def stock_ffcv_two_view(beton, batch: int, workers: int, size: int):
    """What FFCV offers for two views: two RandomResizedCrop decoder pipelines on one field (each JPEG decoded
    twice), flips, no crop windows out and so no matches: a lower bound on the work our loader does."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline import PipelineSpec
    from ffcv.transforms import RandomHorizontalFlip

    from densessl.pipeline.ffcv import use_private_state_types
    use_private_state_types()  # stock FFCV's Loader in a process that also runs DALI's operators

    def view():
        return RandomResizedCropRGBImageDecoder((size, size), scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3))

    pipelines = {"image": [view(), RandomHorizontalFlip()], "label": None, "index": [IntDecoder()],
                 "image2": PipelineSpec("image", decoder=view(), transforms=[RandomHorizontalFlip()])}
    return Loader(str(beton), batch_size=batch, num_workers=workers, order=OrderOption.RANDOM, seed=0,
                  pipelines=pipelines)


def beton_for(root: Path, workers: int) -> Path:
    """The .beton beside an ImageFolder, written once."""
    from densessl.pipeline.ffcv import write_beton
    beton = root.parent / f"{root.name}.beton"
    if not beton.is_file():
        write_beton(root, beton.with_suffix(".partial"), workers=max(1, workers)).rename(beton)
    return beton


def naive_loader(files, batch: int, workers: int, size: int) -> DataLoader:
    """The naive baseline (``NaiveTwoView``) in a DataLoader; batches are (view1, view2, matches, index)."""
    return DataLoader(NaiveTwoView(files, size), batch_size=batch, num_workers=workers,
                      persistent_workers=workers > 0, drop_last=True)


def backend_data(backend: str, root: Path, workers: int):
    """What ``pipeline.build_loader`` reads for ``backend``: the ImageFolder, or (FFCV) its .beton."""
    return beton_for(root, workers) if backend == "ffcv" else root


SYNTHETIC = {"synthetic": 0.0, "synthetic-photo": 12.0}  # name -> grain (see pipeline.synthetic)
DATA_HELP = ("ImageFolder root; or 'photos' (256 ImageNet-like JPEGs cut from scikit-image's photographs: "
             "benchmarks/photos.py), 'synthetic' (500x375 procedural scenes, ~25 kB JPEGs) or 'synthetic-photo' "
             "(the same scenes with grain: ~80 kB JPEGs, slower to decode)")


def resolve_data(data: str, copies: int = 1) -> Path:
    """``data``, or a generated benchmark set (``photos`` or ``SYNTHETIC``); ``copies`` > 1 links each file that
    many times (a bigger epoch for fast GPU loaders without generating more images)."""
    if data == "photos":
        from .photos import write_photo_set
        base = write_photo_set(Path("data") / "bench-photos")
    elif data in SYNTHETIC:
        cfg = SyntheticConfig(height=375, width=500, train_per_class=64, val_per_class=0, videos=0,
                              grain=SYNTHETIC[data])
        base = generate(Path("data") / f"bench-{data}-500x375", cfg) / "train"
    else:
        return Path(data)
    if copies <= 1:
        return base
    root = base.parent.with_name(f"{base.parent.name}-x{copies}") / "train"
    for f in map(Path, scan_image_folder(base).files):
        (root / f.parent.name).mkdir(parents=True, exist_ok=True)
        for c in range(copies):
            link = root / f.parent.name / f"{c:03d}_{f.name}"
            if not link.exists():
                os.link(f, link)
    return root


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="synthetic", help=DATA_HELP)
    p.add_argument("--copies", type=int, default=1, help="generated sets: link each file N times (bigger epochs)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2, help="epochs per timed repetition")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--size", type=int, default=224, help="view size")
    p.add_argument("--backend", default="torch,dali", help="comma-separated view-pair backends to time")
    p.add_argument("--device", type=int, default=None, help="GPU for DALI's mixed decode (default: CPU)")
    args = p.parse_args(argv)
    backends = args.backend.split(",")
    unknown = set(backends) - {"torch", "dali", "ffcv"}
    if unknown:
        p.error(f"unknown backend(s) {sorted(unknown)}; choose from torch, dali, ffcv")

    root = resolve_data(args.data, args.copies)
    files = list(scan_image_folder(root).files)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rates = decoder_rates(files)
    torch.set_num_threads(threads)
    decode = DataLoader(DecodeOnly(files), batch_size=args.batch, num_workers=args.workers,
                        persistent_workers=args.workers > 0, drop_last=True)
    naive = naive_loader(files, args.batch, args.workers, args.size)
    spec = PairSpec(size=(args.size, args.size))

    count = {"tuple": lambda b: b[0].shape[0], "tensor": lambda b: b.shape[0]}
    results = [
        time_loader("decode only (simplejpeg, same files)", decode, args.epochs, args.reps, count["tensor"]),
        time_loader("naive torchvision two-view + numpy matches", naive, args.epochs, args.reps, count["tuple"]),
    ]
    results[0].unit = "img/s"
    if "torch" in backends:
        ours = build_loader("torch", files, spec, batch_size=args.batch, workers=args.workers)
        results.append(time_loader("reference loader (decode once, Numba matches)", ours, args.epochs, args.reps))
    if "dali" in backends:
        dali = build_loader("dali", files, spec, batch_size=args.batch, workers=args.workers, device=args.device)
        where = f"GPU {args.device} mixed decode" if args.device is not None else "CPU"
        results.append(time_loader(f"DALI ({where}, {args.workers} threads)", dali, args.epochs, args.reps))
        tries = torch.cat([batch["tries"] for batch in dali])  # one more epoch
        print(f"DALI overlap rule: {100 * (tries != 1).double().mean():.2f}% of pairs redrawn, "
              f"{100 * (tries == 0).double().mean():.3f}% fell back to a shared window ({len(tries)} pairs)")
    if "ffcv" in backends:
        beton = beton_for(root, args.workers)
        stock = stock_ffcv_two_view(beton, args.batch, args.workers, args.size)
        results.append(time_loader("stock FFCV, two decoder pipelines", stock, args.epochs, args.reps,
                                   count["tuple"]))
        ffcv = build_loader("ffcv", beton, spec, batch_size=args.batch, workers=args.workers)
        results.append(time_loader("FFCV one-decode view pairs + matches", ffcv, args.epochs, args.reps))
        print(f"FFCV one-decode loader: {results[-1].median / results[-2].median:.2f}x stock two-pipeline FFCV "
              f"({beton})")
    print(f"loader throughput: {len(files)} images in {root}, {args.workers} workers, batch {args.batch}, "
          f"{args.size}px views; {machine()}")
    print(f"{'':44s} {'median':>12s} {'':8s} [{'min-max':>17s}] vs naive")
    for r in results:
        print(r.row(results[1].median))
    print("decoders, one core, same files: " + ", ".join(f"{k} {v:,.0f} img/s" for k, v in rates.items()))
    for r in results[2:]:
        print(f"{r.name}: {r.median / results[1].median:.2f}x naive, "
              f"{100 * r.median / results[0].median:.0f}% of decode-only")


if __name__ == "__main__":
    main()
