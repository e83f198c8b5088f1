"""Multi-crop loading in one run: our loader against what a user would otherwise write.

    python -m densessl.benchmarks.multicrop --data photos --views 2x224,6x96 --workers 2 --backends torch,ffcv,dali

Rows, each a loader of ``--batch`` images with ``--workers`` workers (processes or threads), timed by
``common.time_loader`` (images/s, and images/s per busy core):
- ours, per backend: ``build_loader(backend, ..., ViewSpec)``: one decode, every view cut, the sampler's overlap
  rules, affines and matches for every constrained pair, collated;
- ours with the global views only, per backend (what one extra local view costs, as a fraction of a global
  view's cost);
- DINO's pattern (``dinov2/data/augmentations.py`` without its photometric part, which we run on the device):
  PIL decode, then torchvision ``RandomResizedCrop`` (bicubic) with a flip per view, no geometry returned;
- decoding once per view: the same crops, each from its own PIL decode (FFCV's multi-view pipelines, #77);
- what a user who picks Meta's SPDL writes: its thread pipeline, its FFmpeg decoder to RGB, then torchvision's
  RandomResizedCrop (bilinear, antialiased) and flip per view on the decoded tensor (SPDL returns no geometry);
- the same for two views: SPDL with two 224 px crops against our view-pair loader (``PairSpec``, matches).
"""

from __future__ import annotations

import argparse

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from densessl.pipeline import PairSpec, ViewSpec, build_loader
from densessl.pipeline.index import scan_image_folder

from .common import machine, time_loader
from .loader import DATA_HELP, backend_data, resolve_data


class PilViews(Dataset):
    """DINO's pattern: one PIL decode (``per_view=False``) or one per view, then RandomResizedCrop + flip."""

    def __init__(self, files, spec: ViewSpec, per_view: bool = False):
        self.files, self.per_view = files, per_view
        self.groups = [(g.count, transforms.Compose([
            transforms.RandomResizedCrop(g.size, scale=g.scale, ratio=g.ratio,
                                         interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(g.flip_p), transforms.PILToTensor()])) for g in spec.groups]

    def __len__(self) -> int:
        return len(self.files)

    def _decode(self, i):
        with Image.open(self.files[i]) as im:
            return im.convert("RGB")

    def __getitem__(self, i):
        image = None if self.per_view else self._decode(i)
        return [torch.stack([crop(self._decode(i) if self.per_view else image) for _ in range(n)])
                for n, crop in self.groups]


class SpdlViews:
    """An SPDL pipeline over ``files`` whose every iteration is one epoch of batches ``[group views]``: one
    FFmpeg decode per image, then ``count`` torchvision crops and flips per group, on ``workers`` threads."""

    def __init__(self, files, spec: ViewSpec, batch: int, workers: int):
        from torchvision.transforms import v2
        self.files, self.batch, self.workers = files, batch, workers
        self.groups = [(g.count, v2.Compose([v2.RandomResizedCrop(g.size, scale=g.scale, ratio=g.ratio, antialias=True),
                                              v2.RandomHorizontalFlip(g.flip_p)])) for g in spec.groups]

    def _load(self, path):
        import spdl.io
        rgb = spdl.io.load_image(path, filter_desc=spdl.io.get_video_filter_desc(pix_fmt="rgb24"))
        image = torch.from_numpy(spdl.io.to_numpy(rgb)).permute(2, 0, 1)
        return [torch.stack([crop(image) for _ in range(n)]) for n, crop in self.groups]

    def __iter__(self):
        from spdl.pipeline import PipelineBuilder
        pipeline = (PipelineBuilder().add_source(self.files).pipe(self._load, concurrency=self.workers)
                    .aggregate(self.batch, drop_last=True)
                    .pipe(lambda items: [torch.stack(group) for group in zip(*items)])
                    .add_sink(4).build(num_threads=self.workers))
        with pipeline.auto_stop():
            yield from pipeline


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="photos", help=DATA_HELP)
    p.add_argument("--views", default="2x224,6x96")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--backends", default="torch", help="comma-separated: torch, ffcv, dali (CPU)")
    args = p.parse_args(argv)
    root = resolve_data(args.data)
    files = list(scan_image_folder(root).files)
    spec = ViewSpec.multicrop(args.views)
    only_global = ViewSpec.multicrop(args.views.split(",")[0])
    torch.set_num_threads(1)
    print(f"multi-crop loading: {len(files)} images of {root}, views {args.views}, batch {args.batch}, "
          f"{args.workers} workers; {machine()}")

    def pil(per_view):
        return DataLoader(PilViews(files, spec, per_view), batch_size=args.batch, num_workers=args.workers,
                          persistent_workers=args.workers > 0, drop_last=True)

    rows = [("DINO's pattern: PIL decode once, torchvision", pil(False)),
            ("PIL decode per view, torchvision", pil(True)),
            (f"SPDL: decode once, torchvision: {args.views}", SpdlViews(files, spec, args.batch, args.workers)),
            ("SPDL: decode once, torchvision: 2 views",
             SpdlViews(files, ViewSpec.multicrop(f"2x{spec.groups[0].size[0]}"), args.batch, args.workers)),
            ("ours, torch: view pairs with matches", build_loader(
                "torch", root, PairSpec(size=spec.groups[0].size), batch_size=args.batch, workers=args.workers))]
    backends = [b for b in args.backends.split(",") if b]
    for backend in backends:
        data = backend_data(backend, root, args.workers)
        rows += [(f"ours, {backend}: {args.views}", build_loader(backend, data, spec, batch_size=args.batch,
                                                                 workers=args.workers)),
                 (f"ours, {backend}: {args.views.split(',')[0]} only", build_loader(
                     backend, data, only_global, batch_size=args.batch, workers=args.workers))]
    count = lambda batch: (batch["index"] if isinstance(batch, dict) else batch[0]).shape[0]  # noqa: E731
    rates = [time_loader(name, loader, args.epochs, args.reps, count) for name, loader in rows]
    dino = rates[0].median / rates[0].cores if rates[0].cores > 0.05 else rates[0].median
    print(f"{'loader':44s} {'images/s':>12s} {'':8s} {'[min-max]':>19s} vs DINO  per core  per core vs DINO")
    for rate in rates:
        rate.unit = "img/s"
        per_core = rate.median / rate.cores if rate.cores > 0.05 else float("nan")
        print(rate.row(rates[0].median) + f"  {per_core:8.1f}  {per_core / dino:6.2f}x")
    n_local = sum(g.count for g in spec.groups[1:])
    for k, backend in enumerate(backends):
        multi, single = rates[5 + 2 * k], rates[6 + 2 * k]
        if n_local:
            per_image = 1 / multi.median - 1 / single.median
            global_view = 1 / single.median / spec.groups[0].count
            print(f"{backend}: one extra local view costs {per_image / n_local / global_view:.2f} of a global view "
                  f"({per_image / n_local * 1e3:.3f} ms vs {global_view * 1e3:.3f} ms per image, in the loader)")


if __name__ == "__main__":
    main()
