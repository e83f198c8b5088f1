"""What a run keeps in its folder besides checkpoints: the metrics log, the list of skipped images, the RNG
states that make a resumed run draw what the unbroken run drew, and the training data itself when it has to
be generated or converted first."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import torch

from densessl.pipeline import Crop, scan_image_folder
from densessl.pipeline.folder import read_first_readable
from densessl.pipeline.loader import render_view
from densessl.pipeline.synthetic import generate

from .config import TrainConfig
from .distributed import barrier


class MetricsLog:
    """metrics.csv in the run folder; on resume, rows after the checkpoint's step are dropped."""

    FIELDS = ("step", "epoch", "loss", "lr", "images_per_s", "data_wait", "loss_global", "loss_dense")

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        rows = []
        if path.exists() and resume_step > 0:
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, self.FIELDS, extrasaction="ignore")
        self.writer.writeheader()
        self.writer.writerows(rows)

    def write(self, row: dict) -> None:
        self.writer.writerow(row)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class SkippedImages:
    """Unreadable files the loader replaced (``skipped.txt``: path, reason); the run aborts past ``limit``."""

    def __init__(self, path: Path, limit: int):
        self.path, self.limit, self.size, self.files = path, limit, 0, set()

    def over_limit(self) -> bool:
        size = self.path.stat().st_size if self.path.exists() else 0
        if size != self.size:  # only re-read when workers appended
            self.size = size
            self.files = {line.split("\t")[0] for line in self.path.read_text().splitlines() if line}
        return len(self.files) > self.limit


def rng_state(augment_gen: torch.Generator) -> dict:
    """This process's random states: torch (CPU and CUDA), numpy, Python and the augmentation generator."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "augment": augment_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, augment_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    augment_gen.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def data_root(cfg: TrainConfig, rank: int, world: int) -> Path:
    """The ImageFolder (or .beton) to train on; the embedded set is generated, and with backend=ffcv an
    ImageFolder is written once to ``run_dir/train.beton`` (for ImageNet, write it ahead: python -m densessl.pipeline.ffcv)."""
    root = Path(cfg.data)
    if cfg.data == "synthetic":
        if rank == 0:
            generate(cfg.synthetic_dir, progress=cfg.progress)
        root = Path(cfg.synthetic_dir) / "train"
    if cfg.backend == "ffcv" and root.suffix != ".beton":
        beton = Path(cfg.run_dir) / "train.beton"
        if rank == 0 and not beton.is_file():
            from densessl.pipeline.ffcv import write_beton
            print(f"writing {beton} from {root} (once; pass data=<file>.beton to reuse one)", flush=True)
            partial = beton.with_suffix(".partial")
            write_beton(root, partial, workers=cfg.workers, max_bad_images=cfg.max_bad_images).rename(beton)
            bad = partial.with_name(partial.name + ".skipped.txt")
            if bad.exists():  # the writer's list joins the run's
                with open(Path(cfg.run_dir) / "skipped.txt", "a") as f:
                    f.write(bad.read_text())
        root = beton
    barrier(world)
    return root


def fixed_images(root: Path, n: int, size: int) -> torch.Tensor:
    """``n`` training images spread over the data set, centre-cropped square and resized to ``size``: uint8
    ``[n, 3, size, size]``, the same for every run and resume on this data (the pictures of the features)."""
    if root.suffix == ".beton":
        from ffcv.reader import Reader

        from densessl.pipeline.ffcv import read_stored_image
        count = Reader(str(root)).num_samples
        read = lambda i: read_stored_image(root, i)  # noqa: E731
    else:
        files = scan_image_folder(root).files
        count = len(files)
        read = lambda i: read_first_readable(files, i, warn=False)[1]  # noqa: E731  (skips unreadable files)
    out = []
    for i in np.linspace(0, count - 1, min(n, count)).astype(int):
        pixels = read(int(i))
        side = min(pixels.shape[:2])
        crop = Crop((pixels.shape[0] - side) // 2, (pixels.shape[1] - side) // 2, side, side, False)
        out.append(torch.from_numpy(render_view(pixels, crop, (size, size))).permute(2, 0, 1))
    return torch.stack(out)
