"""A Leopart/NeCo-style loop on densessl's multi-crop views, outside the trainer.

Each image gives global and local views from one decode, with their affines. For every local view and every
global view, the region the two share is pooled from both views' feature maps with ``roi_align``
(``pipeline.derived.intersection_boxes`` gives the boxes in each view's pixels), and the loss pulls the pooled
features together. Nothing about the crops is carried through the resize: the boxes come from the affines.

    python examples/leopart_style.py --data data/synthetic/train --views 2x96,4x64 --steps 20
"""

from __future__ import annotations

import argparse

import torch
from torch.nn import functional as F
from torchvision.ops import roi_align

from densessl.model.network import ResNetEncoder
from densessl.pipeline import PhotometricAugment, ViewSpec, build_loader
from densessl.pipeline.derived import intersection_boxes

STRIDE = 4  # the encoder's C2


def pooled(features: torch.Tensor, boxes: torch.Tensor, affines: torch.Tensor, size: int = 3) -> torch.Tensor:
    """``[B, C*size*size]``: each image's box (in view pixels) pooled from its own feature map, its bins put back
    in source order where the view was flipped (so bin k of two views covers the same source region)."""
    rois = torch.cat([torch.arange(len(boxes), dtype=boxes.dtype, device=boxes.device)[:, None], boxes], 1)
    out = roi_align(features, rois, size, spatial_scale=1 / STRIDE, aligned=True)
    flipped = (affines[:, 0, 0] < 0)[:, None, None, None]
    return torch.where(flipped, out.flip(-1), out).flatten(1)


def main(argv=None) -> list[float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/synthetic/train")
    p.add_argument("--views", default="2x96,4x64")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)

    spec = ViewSpec.multicrop(args.views, min_cells=0, num_matches=0)  # overlap by area only, no matches
    loader = build_loader("torch", args.data, spec, batch_size=args.batch, workers=args.workers, seed=0)
    encoder, augment = ResNetEncoder("resnet18"), PhotometricAugment()
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.01, momentum=0.9)
    global_size, local_size = spec.group("global").size, spec.group("local").size
    losses = []
    while len(losses) < args.steps:
        for batch in loader:
            feats = {name: [encoder(augment(v.contiguous(memory_format=torch.channels_last)))[0]
                            for v in batch[f"views/{name}"].unbind(1)] for name in ("global", "local")}
            terms = []
            for k, local in enumerate(feats["local"]):
                for g, glob in enumerate(feats["global"]):
                    box_l, box_g, overlaps = intersection_boxes(batch["affines/local"][:, k], local_size,
                                                                batch["affines/global"][:, g], global_size)
                    a = F.normalize(pooled(local, box_l, batch["affines/local"][:, k]), dim=1)
                    b = F.normalize(pooled(glob, box_g, batch["affines/global"][:, g]), dim=1)
                    terms.append(((1 - (a * b).sum(1)) * overlaps).sum() / overlaps.sum().clamp(min=1))
            loss = torch.stack(terms).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            print(f"step {len(losses)}  loss {losses[-1]:.4f}", flush=True)
            if len(losses) == args.steps:
                break
    return losses


if __name__ == "__main__":
    main()
