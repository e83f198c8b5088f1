"""Figures people look at before numbers: features as RGB (first three principal components) and pixel
retrieval (cosine similarity of one query pixel's embedding to every pixel of other images).

Extractors run on their own device (``features.Extractor`` moves the images there); the pictures are made on
the CPU."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from densessl.model.pictures import pca_rgb  # noqa: E402
from densessl.pipeline.folder import FORMATS  # noqa: E402

from .probe import load_image  # noqa: E402


def _show(images, rows_labels, title, out: Path, cmap=None):
    fig, ax = plt.subplots(len(images), len(images[0]), figsize=(2.2 * len(images[0]), 1.9 * len(images)),
                           squeeze=False)
    for i, (label, row) in enumerate(zip(rows_labels, images)):
        for j, im in enumerate(row):
            ax[i, j].imshow(im, cmap=None if im.ndim == 3 else cmap)
            ax[i, j].set_xticks([])
            ax[i, j].set_yticks([])
        ax[i, 0].set_ylabel(label)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _pictures(images, size):
    return [np.asarray(Image.open(p, formats=FORMATS).convert("RGB").resize(size[::-1])) for p in images]


@torch.no_grad()
def plot_pca(extractors: dict, images: list[Path], out: Path, size=(128, 160)) -> None:
    x = torch.stack([load_image(p, size) for p in images])
    rows = [_pictures(images, size)]
    for fn in extractors.values():
        rows.append([np.asarray(Image.fromarray(r).resize(size[::-1], Image.NEAREST)) for r in pca_rgb(fn(x).float().cpu())])
    _show(rows, ["image", *extractors], "first three principal components of the dense features as RGB", out)


@torch.no_grad()
def plot_retrieval(extractors: dict, images: list[Path], out: Path, size=(128, 160), query=(0.5, 0.5)) -> None:
    """Row per model: similarity of the query pixel of image 0 (at fractional ``query`` (y, x), marked) to
    every pixel of each image, upsampled; bright = similar."""
    x = torch.stack([load_image(p, size) for p in images])
    pictures = _pictures(images, size)
    qy, qx = int(query[0] * size[0]), int(query[1] * size[1])
    marked = pictures[0].copy()
    marked[max(0, qy - 3):qy + 4, max(0, qx - 3):qx + 4] = (255, 0, 0)
    rows = [[marked, *pictures[1:]]]
    for fn in extractors.values():
        f = F.normalize(fn(x).float().cpu(), dim=1)
        h, w = f.shape[-2:]
        q = f[0, :, min(h - 1, int(query[0] * h)), min(w - 1, int(query[1] * w))]
        sim = torch.einsum("c,nchw->nhw", q, f)
        sim = F.interpolate(sim[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        rows.append(list(sim.numpy()))
    _show(rows, ["images", *extractors], "pixel retrieval: similarity to the marked pixel", out, cmap="magma")
