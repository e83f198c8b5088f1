"""Image-level classification from pooled frozen features (VADeR's reviewer R4: what do its pooled features give
for classification?). On the embedded set an image's label is the class of its largest shape: the segmentation
class covering most pixels besides the background. A k-nearest-neighbour vote (cosine similarity of globally
average-pooled features, train set as the memory) predicts it for each validation image: no training, so every
model's features are read the same way. Its trivial baseline always answers the training set's commonest label.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .datasets import DenseSet
from .probe import extract


def largest_classes(data: DenseSet) -> torch.Tensor:
    """``[N]`` each image's label: the non-background class (ids 1..) with the most pixels; 0 if there is none."""
    labels = []
    for i in range(len(data)):
        counts = torch.bincount(torch.from_numpy(data.read_target(i).astype("int64")).flatten(),
                                minlength=data.num_classes)
        counts[0] = 0
        labels.append(int(counts.argmax()) if counts.sum() > 0 else 0)
    return torch.tensor(labels)


def knn_probe(features_fn, train: DenseSet, val: DenseSet, size: tuple[int, int], k: int = 10,
              cache: dict | None = None) -> dict:
    """Top-1 accuracy of a ``k``-NN vote (each neighbour weighted by its cosine similarity) over pooled
    features, and the trivial baseline's (the training set's commonest label). ``cache``: as ``extract``'s."""
    y_train, y_val = largest_classes(train), largest_classes(val)
    pooled = [F.normalize(extract(features_fn, d, size, cache=cache).mean((2, 3)), dim=1) for d in (train, val)]
    sims = pooled[1] @ pooled[0].T  # [val, train]
    top, idx = sims.topk(min(k, len(train)), dim=1)
    votes = torch.zeros(len(val), int(max(y_train.max(), y_val.max())) + 1).scatter_add_(1, y_train[idx], top)
    majority = torch.bincount(y_train).argmax()
    return {"top-1": float((votes.argmax(1) == y_val).float().mean()),
            "trivial": {"top-1": float((y_val == majority).float().mean())}}
