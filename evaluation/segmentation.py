"""Linear-probe semantic segmentation on frozen dense features (1x1 conv, cross-entropy, mIoU).

Features are extracted once (the network is frozen), standardised per channel with training statistics, and a
1x1 convolution is fitted on them at feature resolution; predictions are upsampled to label resolution for mIoU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from pipeline.augment import IMAGENET_MEAN, IMAGENET_STD

IGNORE = 255


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    keep = target != IGNORE
    idx = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes ** 2).view(num_classes, num_classes)


def iou_per_class(conf: torch.Tensor) -> torch.Tensor:
    """IoU of each class from a confusion matrix (rows: truth); NaN for classes in neither truth nor prediction."""
    tp = conf.diag().double()
    union = conf.sum(0).double() + conf.sum(1).double() - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def mean_iou(conf: torch.Tensor) -> float:
    return float(np.nanmean(iou_per_class(conf).numpy()))


@dataclass
class SegmentationSet:
    images: list[Path]
    labels: list[Path]
    num_classes: int


def synthetic_split(root: str | Path, split: str) -> SegmentationSet:
    """The embedded set's labelled scenes: ``root/{split}/<class>/<stem>.jpg`` + ``root/labels/...png``."""
    root = Path(root)
    images = sorted((root / split).glob("*/*.jpg"))
    if not images:
        raise FileNotFoundError(f"no {split} images under {root} (generate with python -m pipeline.synthetic)")
    labels = [root / "labels" / split / p.parent.name / f"{p.stem}.png" for p in images]
    return SegmentationSet(images, labels, num_classes=5)


def load_image(path: Path, size: tuple[int, int]) -> torch.Tensor:
    with Image.open(path) as im:
        x = torch.from_numpy(np.array(im.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)))
    x = x.permute(2, 0, 1).float() / 255
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def load_label(path: Path, size: tuple[int, int]) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.resize((size[1], size[0]), Image.NEAREST)).astype(np.int64))


@torch.no_grad()
def extract(features_fn, data: SegmentationSet, size: tuple[int, int], batch: int = 16, device="cpu",
            desc: str = "features"):
    """Frozen features ``[N, C, h, w]`` and labels ``[N, H, W]`` (images resized to ``size``)."""
    feats, labels = [], []
    for i in tqdm(range(0, len(data.images), batch), desc=desc, leave=False):
        x = torch.stack([load_image(p, size) for p in data.images[i:i + batch]]).to(device)
        feats.append(features_fn(x).float().cpu())
        labels.append(torch.stack([load_label(p, size) for p in data.labels[i:i + batch]]))
    return torch.cat(feats), torch.cat(labels)


def fit_probe(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int = 60, lr: float = 0.05,
              seed: int = 0):
    """Fit a 1x1 conv on standardised features; returns (mean, std, probe)."""
    torch.manual_seed(seed)
    mean = feats.mean((0, 2, 3), keepdim=True)
    std = feats.std((0, 2, 3), keepdim=True) + 1e-6
    x = (feats - mean) / std
    target = F.interpolate(labels[:, None].float(), size=x.shape[-2:], mode="nearest")[:, 0].long()
    probe = nn.Conv2d(x.shape[1], num_classes, 1)
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(32):
            loss = F.cross_entropy(probe(x[idx]), target[idx], ignore_index=IGNORE)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return mean, std, probe


@torch.no_grad()
def evaluate_probe(mean, std, probe, feats, labels, num_classes: int) -> tuple[float, torch.Tensor]:
    """mIoU at label resolution; returns (mIoU, per-class IoU)."""
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for i in range(0, len(feats), 32):
        logits = probe((feats[i:i + 32] - mean) / std)
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        conf += confusion(logits.argmax(1), labels[i:i + 32], num_classes)
    return mean_iou(conf), iou_per_class(conf)


def linear_probe(features_fn, train: SegmentationSet, test: SegmentationSet, size=(128, 160), device="cpu",
                 epochs: int = 60) -> tuple[float, torch.Tensor]:
    """Train the probe on ``train`` and report mIoU on ``test``."""
    f_train, y_train = extract(features_fn, train, size, device=device, desc="probe train features")
    f_test, y_test = extract(features_fn, test, size, device=device, desc="probe test features")
    mean, std, probe = fit_probe(f_train, y_train, train.num_classes, epochs)
    return evaluate_probe(mean, std, probe, f_test, y_test, test.num_classes)
