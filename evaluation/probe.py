"""Linear probes on frozen dense features: semantic segmentation (cross-entropy, mIoU) and depth (least squares, RMSE).

Features are extracted once (the network is frozen), standardised per channel with training statistics, and a
1x1 convolution is fitted at feature resolution; predictions are upsampled to target resolution for the metrics.
Every result carries the probe's final training loss, whether it converged, and the trivial baseline's score
(majority class, mean depth), which a probe worth reporting beats.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from densessl.pipeline.augment import normalize
from densessl.pipeline.folder import FORMATS
from densessl.pipeline.progress import progress

from .datasets import DenseSet
from .metrics import IGNORE, confusion, depth_errors, eigen_crop, iou_per_class, mean_errors, mean_iou


def load_uint8(path, size: tuple[int, int]) -> torch.Tensor:
    """An image resized to ``size`` (H, W) as uint8 ``[3, H, W]``."""
    with Image.open(path, formats=FORMATS) as im:
        return torch.from_numpy(np.array(im.convert("RGB").resize((size[1], size[0]), Image.BILINEAR))).permute(2, 0, 1)


def load_image(path, size: tuple[int, int]) -> torch.Tensor:
    """An image resized to ``size`` (H, W), normalised as in training."""
    return normalize(load_uint8(path, size).float() / 255)


def resize_target(target: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    mode = "F" if target.dtype == np.float32 else "L"
    im = Image.fromarray(target, mode=mode).resize((size[1], size[0]), Image.NEAREST)
    return torch.from_numpy(np.array(im))


@torch.no_grad()
def extract(features_fn, data: DenseSet, size: tuple[int, int], batch: int = 16,
            cache: dict | None = None) -> torch.Tensor:
    """Frozen features ``[N, C, h, w]`` (on the CPU) of images resized to ``size``. ``features_fn`` runs where
    its weights are (``features.Extractor`` moves its inputs there). With a ``cache`` (one dict per
    extractor), the features of the same images at the same size are computed once and then read back: the
    embedded set's segmentation, depth and classification probes all read the same scenes."""
    key = (tuple(map(str, data.images)), tuple(size))
    if cache is not None and key in cache:
        return cache[key]
    feats = []
    for i in progress(range(0, len(data), batch), f"features: {data.name}", unit="batch"):
        x = torch.stack([load_image(p, size) for p in data.images[i:i + batch]])
        feats.append(features_fn(x).float().cpu())
    feats = torch.cat(feats)
    if cache is not None:
        cache[key] = feats
    return feats


def resized_targets(data: DenseSet, size: tuple[int, int]) -> torch.Tensor:
    """Targets ``[N, H, W]`` at ``size`` (nearest): long class ids or float metres, to fit a probe on."""
    y = torch.stack([resize_target(data.read_target(j), size) for j in range(len(data))])
    return y.float() if data.task == "depth" else y.long()


@dataclass
class Probe:
    """A fitted linear probe: standardisation (training statistics), the 1x1 conv, and its training curve
    (the loss at each L-BFGS evaluation; one value, the training RMSE, for depth's closed form)."""

    mean: torch.Tensor
    std: torch.Tensor
    layer: nn.Conv2d
    losses: list[float]

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        return self.layer((feats - self.mean) / self.std)

    @property
    def converged(self) -> bool:
        """The loss moved less than 1% over the last fifth of training (always, for the closed form)."""
        tail = self.losses[-max(2, len(self.losses) // 5):]
        return len(self.losses) == 1 or abs(tail[0] - tail[-1]) <= 0.01 * abs(tail[0])


def fit_probe(feats: torch.Tensor, targets: torch.Tensor, task: str, num_classes: int = 0, steps: int = 300,
              weight_decay: float = 1e-3, ridge: float = 1e-3) -> Probe:
    """A 1x1 conv on per-channel standardised features, fitted to convergence.

    Segmentation: cross-entropy over all training pixels at once plus a small L2 penalty (``weight_decay``),
    which makes the problem strictly convex, minimised by L-BFGS for at most ``steps`` iterations: no learning
    rate or epoch count to tune per feature set, and a curve that shows whether it got there.
    Depth: least squares on valid pixels (target > 0), solved in closed form with a small ridge (``ridge`` times
    the mean feature variance), so the fit is exact whatever the conditioning of the features; its loss is the
    training RMSE. A gradient-fitted L1 probe stalled on some feature sets (issue 18)."""
    mean = feats.mean((0, 2, 3), keepdim=True)
    std = feats.std((0, 2, 3), keepdim=True) + 1e-6
    y = F.interpolate(targets[:, None].float(), size=feats.shape[-2:], mode="nearest")[:, 0]
    layer = nn.Conv2d(feats.shape[1], num_classes if task == "segmentation" else 1, 1)
    if task == "depth":
        return _fit_least_squares(Probe(mean, std, layer, []), feats, y, ridge)
    probe = Probe(mean, std, layer, [])
    # pixels as rows of one matrix, standardised once
    x = ((feats - mean) / std).permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
    labels = y.long().reshape(-1)
    keep = labels != IGNORE
    x, labels = x[keep], labels[keep]
    weight = layer.weight.view(layer.out_channels, -1)
    opt = torch.optim.LBFGS(layer.parameters(), lr=1, max_iter=steps, history_size=20, tolerance_change=1e-7,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(F.linear(x, weight, layer.bias), labels) + weight_decay / 2 * weight.square().sum()
        loss.backward()
        probe.losses.append(loss.item())
        return loss

    opt.step(closure)
    return probe


@torch.no_grad()
def _fit_least_squares(probe: Probe, feats: torch.Tensor, y: torch.Tensor, ridge: float) -> Probe:
    c = feats.shape[1]
    gram = torch.zeros(c + 1, c + 1, dtype=torch.float64)
    rhs = torch.zeros(c + 1, dtype=torch.float64)
    for i in range(len(feats)):  # one image at a time: the design matrix is never built whole
        valid = (y[i] > 0).reshape(-1)
        x = ((feats[i:i + 1] - probe.mean) / probe.std)[0].reshape(c, -1)[:, valid].T.double()
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        gram += x.T @ x
        rhs += x.T @ y[i].reshape(-1)[valid].double()
    n = float(gram[-1, -1])
    if n == 0:
        raise ValueError("depth probe: no valid depth (> 0) in the training targets")
    penalty = ridge * float(gram.diagonal()[:-1].mean()) * torch.eye(c + 1, dtype=torch.float64)
    penalty[-1, -1] = 0  # the bias is not shrunk
    w = torch.linalg.solve(gram + penalty, rhs)
    probe.layer.weight.copy_(w[:-1].float().view(1, c, 1, 1))
    probe.layer.bias.copy_(w[-1:].float())
    # training mean squared error from the same sums: (w'Gw - 2w'r + sum y^2) / n
    y2 = sum(float((y[i][y[i] > 0].double() ** 2).sum()) for i in range(len(y)))
    mse = (w @ gram @ w - 2 * w @ rhs + y2) / n
    probe.losses.append(float(mse.clamp(min=0).sqrt()))
    return probe


def trivial_probe(targets: torch.Tensor, task: str, channels: int, num_classes: int = 0) -> Probe:
    """The baseline every probe must beat: the training set's majority class, or its mean valid depth,
    predicted everywhere (zero weights)."""
    layer = nn.Conv2d(channels, num_classes if task == "segmentation" else 1, 1)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
        if task == "segmentation":
            counts = torch.bincount(targets[targets != IGNORE].reshape(-1), minlength=num_classes)
            layer.bias[int(counts.argmax())] = 1.0
        else:
            layer.bias.fill_(float(targets[targets > 0].mean()))
    zeros = torch.zeros(1, channels, 1, 1)
    return Probe(zeros, zeros + 1, layer, [float("nan")])


@torch.no_grad()
def evaluate_probe(probe: Probe, feats, test: DenseSet) -> dict:
    """Predictions upsampled (bilinear) to each test image's own target resolution and scored there, as the
    field's evaluation code does: mIoU from one confusion matrix over all pixels; the depth metrics per image
    (valid range, Eigen crop where the set asks for it), averaged over images."""
    conf = torch.zeros(test.num_classes, test.num_classes, dtype=torch.long)
    per_image = []
    for i in range(len(test)):
        target = torch.from_numpy(test.read_target(i))
        out = F.interpolate(probe(feats[i:i + 1]), size=target.shape, mode="bilinear", align_corners=False)[0]
        if test.task == "segmentation":
            conf += confusion(out.argmax(0), target.long(), test.num_classes)
        else:
            crop = eigen_crop(target.shape) if test.eigen_crop else None
            per_image.append(depth_errors(out[0], target, test.depth_range, crop))
    if test.task == "segmentation":
        return {"mIoU": mean_iou(conf), "IoU": iou_per_class(conf).tolist()}
    return mean_errors(per_image)


def linear_probe(features_fn, train: DenseSet, test: DenseSet, size=(128, 160), steps: int = 300,
                 cache: dict | None = None) -> dict:
    """Fit on ``train`` at ``size``, report on ``test`` at its own resolution: {'mIoU', 'IoU'} or the depth
    metrics (``metrics.DEPTH_METRICS``), with the probe's final training loss (``probe loss``), whether it had
    flattened (``probe converged``), and the same metrics of the trivial probe (``trivial``). ``cache``: as
    ``extract``'s."""
    if train.task != test.task:
        raise ValueError(f"train is {train.task}, test is {test.task}")
    feats, targets = extract(features_fn, train, size, cache=cache), resized_targets(train, size)
    probe = fit_probe(feats, targets, train.task, train.num_classes, steps)
    del feats
    test_feats = extract(features_fn, test, size, cache=cache)
    trivial = trivial_probe(targets, train.task, test_feats.shape[1], train.num_classes)
    return {**evaluate_probe(probe, test_feats, test), "probe loss": probe.losses[-1],
            "probe converged": probe.converged, "trivial": evaluate_probe(trivial, test_feats, test)}


def warn_if_unreliable(result: dict, metric: str, label: str) -> None:
    """Warn on stderr, naming ``label``, when a ``linear_probe`` result had not converged or its ``metric``
    does not beat the trivial probe's."""
    lower_is_better = metric in ("AbsRel", "SqRel", "RMSE", "RMSE log")
    value, trivial = result[metric], result["trivial"][metric]
    if not result["probe converged"]:
        print(f"warning: {label}: probe loss still moving at the end ({result['probe loss']:.4f}): raise --probe-steps",
              file=sys.stderr)
    if (value >= trivial) if lower_is_better else (value <= trivial):
        print(f"warning: {label}: probe {metric} {value:.3f} does not beat the trivial baseline's {trivial:.3f}",
              file=sys.stderr)
