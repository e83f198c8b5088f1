"""Video object mask propagation by nearest neighbours in embedding space (DAVIS-2017 protocol).

The first frame's mask is given. Each later frame's labels are a softmax-weighted vote of its ``topk`` most
similar feature cells among the first frame and the ``context`` previous frames, restricted to a ``radius`` (in
feature cells) around the query's position, with similarities divided by ``temperature``: the standard settings
of label-propagation evaluations (top-k 5, 7 previous frames + the first, radius 12, T=0.07). Reported as the
official DAVIS-2017 evaluation reports them: J (IoU) and F (boundary) on every frame but the first and the last;
per object their mean, recall and decay; each averaged over all objects; J&F the mean of the J and F means.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from densessl.pipeline.folder import FORMATS
from densessl.pipeline.progress import progress
from densessl.pipeline.synthetic import DAVIS_PALETTE

from .datasets import Video
from .metrics import boundary_f, davis_statistics, jaccard
from .probe import load_image


@torch.no_grad()
def propagate(feats: list[torch.Tensor], first_labels: torch.Tensor, topk: int = 5, context: int = 7,
              radius: int = 12, temperature: float = 0.07, rows: int = 8) -> list[torch.Tensor]:
    """``feats``: per-frame ``[C, h, w]``; ``first_labels``: ``[L, h, w]`` soft labels of frame 0.
    Returns ``[L, h, w]`` soft labels for every frame (frame 0's as given)."""
    c, h, w = feats[0].shape
    feats = [F.normalize(f, dim=0) for f in feats]
    labels = [first_labels]
    yy, xx = torch.meshgrid(torch.arange(h, device=first_labels.device),
                            torch.arange(w, device=first_labels.device), indexing="ij")
    for t in range(1, len(feats)):
        ids = [0] + list(range(max(1, t - context), t))
        ctx_f = torch.stack([feats[i] for i in ids])  # [K, C, h, w]
        ctx_l = torch.stack([labels[i] for i in ids])  # [K, L, h, w]
        out = torch.empty_like(first_labels)
        for y0 in range(0, h, rows):
            y1 = min(h, y0 + rows)
            b0, b1 = max(0, y0 - radius), min(h, y1 + radius)
            q = feats[t][:, y0:y1].reshape(c, -1).T  # [Q, C]
            keys = ctx_f[:, :, b0:b1].permute(1, 0, 2, 3).reshape(c, -1)  # [C, K*band*w]
            sim = q @ keys / temperature
            dy = yy[y0:y1].reshape(-1, 1) - yy[b0:b1].reshape(1, -1)
            dx = xx[y0:y1].reshape(-1, 1) - xx[b0:b1].reshape(1, -1)
            near = (dy ** 2 + dx ** 2 <= radius ** 2).repeat(1, len(ids))  # same window in every context frame
            sim = sim.masked_fill(~near, float("-inf"))
            top, idx = sim.topk(min(topk, sim.shape[1]), dim=1)
            weights = top.softmax(1)  # [Q, k]
            votes = ctx_l[:, :, b0:b1].permute(1, 0, 2, 3).reshape(ctx_l.shape[1], -1)[:, idx]  # [L, Q, k]
            out[:, y0:y1] = (votes * weights).sum(-1).view(-1, y1 - y0, w)
        labels.append(out)
    return labels


def _read_mask(path) -> np.ndarray:
    with Image.open(path, formats=FORMATS) as im:
        return np.asarray(im).astype(np.int64)


@torch.no_grad()
def evaluate_video(features_fn, video: Video, size: tuple[int, int] | None = None, save_masks: Path | None = None,
                   **settings) -> list[dict[str, float]]:
    """Per object of this video: DAVIS statistics (mean, recall, decay) of J and F over the scored frames (all
    but the first and the last). ``size`` (H, W) resizes frames (default: as stored, rounded up to multiples of
    32, which the encoder needs); masks are scored at their own resolution. Propagation runs where
    ``features_fn`` returns its features (its weights' device). ``save_masks``: a folder that receives the
    predicted masks as indexed PNGs (``<video>/<frame>.png``, DAVIS's results layout, for its official code)."""
    first = _read_mask(video.masks[0])
    size = tuple(-(-s // 32) * 32 for s in (size or first.shape))
    feats = [features_fn(load_image(f, size)[None])[0].float() for f in video.frames]
    # objects 1..the largest id of the first mask (void, 255, aside), as DAVIS numbers them: an id the first
    # frame lacks is still scored, and never predicted
    objects = list(range(1, int(np.where(first == 255, 0, first).max()) + 1))
    onehot = torch.from_numpy(np.stack([first == o for o in [0, *objects]])).float()[None]
    onehot = F.interpolate(onehot, size=size, mode="nearest")
    first_labels = F.interpolate(onehot, size=feats[0].shape[-2:], mode="area")[0].to(feats[0].device)
    labels = propagate(feats, first_labels, **settings)
    frames = range(1, len(video.frames) - 1) if len(video.frames) > 2 else range(1, len(video.frames))
    scores = {o: ([], []) for o in objects}
    for t in frames:
        if not video.masks[t].is_file():
            continue
        truth = torch.from_numpy(_read_mask(video.masks[t]))
        up = F.interpolate(labels[t][None].cpu(), size=truth.shape, mode="bilinear", align_corners=False)[0]
        pred = torch.tensor([0, *objects])[up.argmax(0)]
        if save_masks is not None:
            _save_mask(pred, Path(save_masks) / video.name / f"{Path(video.frames[t]).stem}.png")
        for o in objects:
            scores[o][0].append(jaccard(pred == o, truth == o))
            scores[o][1].append(boundary_f(pred == o, truth == o))
    return [{f"{m} {k}": v for m, values in zip("JF", per_frame) for k, v in davis_statistics(values).items()}
            for per_frame in scores.values() if per_frame[0]]


def _save_mask(pred: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(pred.numpy().astype(np.uint8), mode="P")
    im.putpalette(DAVIS_PALETTE)
    im.save(path)


def evaluate_videos(features_fn, videos: list[Video], size=None, save_masks: Path | None = None,
                    **settings) -> dict[str, float]:
    """DAVIS's summary: each statistic of J and F averaged over all objects of all videos, and J&F (the mean of
    the J and F means)."""
    objects = [o for v in progress(videos, "propagation", unit="video")
               for o in evaluate_video(features_fn, v, size, save_masks, **settings)]
    if not objects:
        raise ValueError("no object was scored: the videos have no annotated frame after the first")
    summary = {key: float(np.mean([o[key] for o in objects])) for key in objects[0]}
    out = {"J": summary.pop("J mean"), "F": summary.pop("F mean")}
    return {**out, "J&F": (out["J"] + out["F"]) / 2, **summary}
