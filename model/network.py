"""Networks: a torchvision ResNet encoder, the VADeR FPN decoder, and MoCo v2 / DenseCL projection heads.

The encoder is torchvision's own ResNet module (minus ``fc``), so torchvision and MoCo v2 checkpoints load into
it unchanged and trained encoders export as plain torchvision state dicts.
"""

from __future__ import annotations

import math

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from .objectives import objective as lookup_objective

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")


class ResNetEncoder(nn.Module):
    """A torchvision ResNet returning C2..C5 (strides 4, 8, 16, 32)."""

    def __init__(self, arch: str = "resnet50"):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
        net = getattr(torchvision.models, arch)(weights=None)
        del net.fc
        self.net = net
        block = net.layer1[0]
        width = block.conv3.out_channels if hasattr(block, "conv3") else block.conv2.out_channels
        self.channels = (width, width * 2, width * 4, width * 8)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        c2 = n.layer1(x)
        c3 = n.layer2(c2)
        c4 = n.layer3(c3)
        return [c2, c3, c4, n.layer4(c4)]


class BilinearUp2(nn.Module):
    """2x bilinear upsampling (align_corners=False), the same as ``nn.Upsample(scale_factor=2, mode="bilinear")``.

    On CUDA the input is made channels_last first. The decoder's GroupNorm returns NCHW tensors, and CUDA's NCHW
    bilinear kernel gives one thread per output position that loops over every image and channel, which made
    these upsamplings the largest cost of the VADeR step on an H100 (benchmarks/RESULTS.md). The channels_last
    kernel gives a thread per output value."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def _conv_gn_relu(cin: int, cout: int, groups: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cout), nn.ReLU(inplace=True)]


class FPNDecoder(nn.Module):
    """Top-down FPN over C2..C5, then per level (3x3 conv, GroupNorm, ReLU, 2x bilinear) blocks up to 1/4
    scale, summed, and a final 1x1 conv: the decoder of VADeR (the Panoptic FPN semantic branch)."""

    def __init__(self, in_channels, fpn_dim: int = 256, dim: int = 128, groups: int = 32):
        super().__init__()
        groups = math.gcd(groups, dim)
        self.lateral = nn.ModuleList(nn.Conv2d(c, fpn_dim, 1) for c in in_channels)
        self.levels = nn.ModuleList()
        for level in range(len(in_channels)):  # level 0 is already at 1/4 scale
            layers = []
            for i in range(max(1, level)):
                layers += _conv_gn_relu(fpn_dim if i == 0 else dim, dim, groups)
                if level > 0:
                    layers.append(BilinearUp2())
            self.levels.append(nn.Sequential(*layers))
        self.out = nn.Conv2d(dim, dim, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        p = [lat(f) for lat, f in zip(self.lateral, feats)]
        for i in range(len(p) - 1, 0, -1):
            p[i - 1] = p[i - 1] + F.interpolate(p[i], size=p[i - 1].shape[-2:], mode="nearest")
        return self.out(sum(block(x) for block, x in zip(self.levels, p)))


def mlp(cin: int, hidden: int, cout: int, dense: bool = False) -> nn.Sequential:
    """MoCo v2's two-layer projection head; 1x1 convolutions for DenseCL's dense head."""
    if dense:
        return nn.Sequential(nn.Conv2d(cin, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, cout, 1))
    return nn.Sequential(nn.Linear(cin, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, cout))


class DenseNetwork(nn.Module):
    """Encoder plus the heads its objective lists (``objectives.OBJECTIVES``): ``vader`` the FPN decoder,
    ``mocov2`` a global head, ``densecl`` global and dense heads. ``forward`` returns a dict of the outputs that
    exist."""

    def __init__(self, arch: str = "resnet50", objective: str = "vader", dim: int = 128):
        super().__init__()
        heads = lookup_objective(objective).heads
        self.encoder = ResNetEncoder(arch)
        c5 = self.encoder.channels[-1]
        self.decoder = FPNDecoder(self.encoder.channels, dim=dim) if "decoder" in heads else None
        self.global_head = mlp(c5, c5, dim) if "global_head" in heads else None
        self.dense_head = mlp(c5, c5, dim, dense=True) if "dense_head" in heads else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.encoder(x)
        out = {"c5": feats[-1]}
        if self.decoder is not None:
            out["dense"] = self.decoder(feats)
        if self.global_head is not None:
            out["global"] = self.global_head(feats[-1].mean((2, 3)))
        if self.dense_head is not None:
            out["dense"] = self.dense_head(feats[-1])
        return out


def load_weights(module: nn.Module, state: dict, what: str, optional: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``module``, all of it: a missing or unexpected key (other than those starting with
    one of ``optional``) or a shape mismatch is a ``ValueError`` that names ``what`` and the first offenders,
    since a silently partial load would train or evaluate a half-random network."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch: another architecture
        details = [line.strip() for line in str(err).splitlines()[1:] if line.strip()] or [str(err).strip()]
        raise ValueError(f"{what} does not fit {type(module).__name__}: {'; '.join(details[:3])}") from None
    missing = [k for k in missing if not k.startswith(optional)] if optional else missing
    unexpected = [k for k in unexpected if not k.startswith(optional)] if optional else unexpected
    if missing or unexpected:
        raise ValueError(f"{what} does not fit {type(module).__name__}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
