"""Linear probes on frozen dense features: semantic segmentation (cross-entropy, mIoU) and depth (L1, RMSE).

Features are extracted once (the network is frozen), standardised per channel with training statistics, and a
1x1 convolution is fitted at feature resolution; predictions are upsampled to target resolution for the metrics.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from pipeline.augment import IMAGENET_MEAN, IMAGENET_STD

from .datasets import DenseSet
from .metrics import IGNORE, confusion, depth_errors, eigen_crop, iou_per_class, mean_errors, mean_iou


def load_image(path, size: tuple[int, int]) -> torch.Tensor:
    """An image resized to ``size`` (H, W), normalised as in training."""
    with Image.open(path) as im:
        x = torch.from_numpy(np.array(im.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)))
    x = x.permute(2, 0, 1).float() / 255
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _resize_target(target: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    mode = "F" if target.dtype == np.float32 else "L"
    im = Image.fromarray(target, mode=mode).resize((size[1], size[0]), Image.NEAREST)
    return torch.from_numpy(np.array(im))


@torch.no_grad()
def extract(features_fn, data: DenseSet, size: tuple[int, int], batch: int = 16) -> torch.Tensor:
    """Frozen features ``[N, C, h, w]`` (on the CPU) of images resized to ``size``. ``features_fn`` runs where
    its weights are (``features.Extractor`` moves its inputs there)."""
    feats = []
    for i in tqdm(range(0, len(data), batch), desc=f"features: {data.name}", leave=False):
        x = torch.stack([load_image(p, size) for p in data.images[i:i + batch]])
        feats.append(features_fn(x).float().cpu())
    return torch.cat(feats)


def resized_targets(data: DenseSet, size: tuple[int, int]) -> torch.Tensor:
    """Targets ``[N, H, W]`` at ``size`` (nearest): long class ids or float metres, to fit a probe on."""
    y = torch.stack([_resize_target(data.read_target(j), size) for j in range(len(data))])
    return y.float() if data.task == "depth" else y.long()


def fit_probe(feats: torch.Tensor, targets: torch.Tensor, task: str, num_classes: int = 0, epochs: int = 60,
              lr: float = 0.05, seed: int = 0):
    """A 1x1 conv on standardised features; returns (mean, std, probe)."""
    torch.manual_seed(seed)
    mean = feats.mean((0, 2, 3), keepdim=True)
    std = feats.std((0, 2, 3), keepdim=True) + 1e-6
    x = (feats - mean) / std
    y = F.interpolate(targets[:, None].float(), size=x.shape[-2:], mode="nearest")[:, 0]
    probe = nn.Conv2d(x.shape[1], num_classes if task == "segmentation" else 1, 1)
    if task == "depth":
        nn.init.constant_(probe.bias, float(y[y > 0].mean()))
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(32):
            out = probe(x[idx])
            if task == "segmentation":
                loss = F.cross_entropy(out, y[idx].long(), ignore_index=IGNORE)
            else:
                valid = y[idx] > 0
                loss = (out[:, 0] - y[idx]).abs()[valid].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return mean, std, probe


@torch.no_grad()
def evaluate_probe(mean, std, probe, feats, test: DenseSet) -> dict:
    """Predictions upsampled (bilinear) to each test image's own target resolution and scored there, as the
    field's evaluation code does: mIoU from one confusion matrix over all pixels; the depth metrics per image
    (valid range, Eigen crop where the set asks for it), averaged over images."""
    conf = torch.zeros(test.num_classes, test.num_classes, dtype=torch.long)
    per_image = []
    for i in range(len(test)):
        target = torch.from_numpy(test.read_target(i))
        out = F.interpolate(probe((feats[i:i + 1] - mean) / std), size=target.shape, mode="bilinear",
                            align_corners=False)[0]
        if test.task == "segmentation":
            conf += confusion(out.argmax(0), target.long(), test.num_classes)
        else:
            crop = eigen_crop(target.shape) if test.eigen_crop else None
            per_image.append(depth_errors(out[0], target, test.depth_range, crop))
    if test.task == "segmentation":
        return {"mIoU": mean_iou(conf), "IoU": iou_per_class(conf).tolist()}
    return mean_errors(per_image)


def linear_probe(features_fn, train: DenseSet, test: DenseSet, size=(128, 160), epochs: int = 60) -> dict:
    """Fit on ``train`` at ``size``, report on ``test`` at its own resolution: {'mIoU', 'IoU'} or the depth
    metrics (``metrics.DEPTH_METRICS``)."""
    if train.task != test.task:
        raise ValueError(f"train is {train.task}, test is {test.task}")
    fitted = fit_probe(extract(features_fn, train, size), resized_targets(train, size), train.task,
                       train.num_classes, epochs)
    return evaluate_probe(*fitted, extract(features_fn, test, size), test)
