"""Image-level classification from pooled frozen features (VADeR's reviewer R4: what do its pooled features give
for classification?). On the embedded set an image's label is the class of its largest shape: the segmentation
class covering most pixels besides the background.

The features are average-pooled over that class's pixels, read from the ground-truth labels on training and
validation images alike (the region is given; only what the features say about it is scored), so each image
gives one vector that describes one object, as an object-centric photo's globally pooled features do. The scenes
hold up to four shapes on a textured ground, and pooled over the whole scene the label was lost (a k-NN vote on
globally pooled features, this probe's first protocol, stayed at chance for every model, trained or random).
A linear classifier is fitted on the training images' vectors with the segmentation probe's own code
(``probe.fit_probe``: standardised, L-BFGS to convergence, the same small L2 penalty) and scored on the
validation images, which are lit differently. Only the features differ between models. Its trivial baseline
answers the training set's commonest label.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .datasets import DenseSet
from .probe import extract, fit_probe, resized_targets


def largest_classes(data: DenseSet) -> torch.Tensor:
    """``[N]`` each image's label: the non-background class (ids 1..) with the most pixels; 0 if there is none."""
    labels = []
    for i in range(len(data)):
        counts = torch.bincount(torch.from_numpy(data.read_target(i).astype("int64")).flatten(),
                                minlength=data.num_classes)
        counts[0] = 0
        labels.append(int(counts.argmax()) if counts.sum() > 0 else 0)
    return torch.tensor(labels)


def pooled_over_label(feats: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[N, C, 1, 1]``: each image's features ``[N, C, h, w]`` averaged over the pixels of its label's class in
    ``targets`` ``[N, H, W]``, each feature cell weighted by the share of its pixels that class covers (so a
    coarse feature map, like DenseCL's, is pooled over the same region); an image without pixels of its label
    gets 0 (a scene without shapes has label 0, the background, and is pooled over it)."""
    weights = F.adaptive_avg_pool2d((targets == labels[:, None, None]).float()[:, None], feats.shape[-2:])
    return (feats * weights).sum((2, 3), keepdim=True) / weights.sum((2, 3), keepdim=True).clamp_min(1e-12)


def shape_probe(features_fn, train: DenseSet, val: DenseSet, size: tuple[int, int], steps: int = 300,
                cache: dict | None = None) -> dict:
    """Top-1 accuracy of the linear classifier on label-pooled features (module docstring), the probe's final
    training loss (``probe loss``), whether it had flattened (``probe converged``), and the trivial baseline's
    top-1 (``trivial``), as ``probe.linear_probe`` reports. ``cache``: as ``extract``'s."""
    if train.task != "segmentation" or val.task != "segmentation":
        raise ValueError(f"classification reads segmentation labels; got {train.task} and {val.task} sets")
    (x_train, y_train), (x_val, y_val) = [
        (pooled_over_label(extract(features_fn, d, size, cache=cache), resized_targets(d, size), y), y)
        for d, y in ((train, largest_classes(train)), (val, largest_classes(val)))]
    probe = fit_probe(x_train, y_train[:, None, None], "segmentation", train.num_classes, steps)
    with torch.no_grad():
        predicted = probe(x_val)[:, :, 0, 0].argmax(1)
    majority = torch.bincount(y_train).argmax()
    return {"top-1": float((predicted == y_val).float().mean()), "probe loss": probe.losses[-1],
            "probe converged": probe.converged, "trivial": {"top-1": float((y_val == majority).float().mean())}}
