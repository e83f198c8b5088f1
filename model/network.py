"""Networks: the encoders (a torchvision ResNet here, a timm ViT in ``vit``), and the heads methods put on them (an
FPN decoder to stride 4, a global projection MLP, a dense 1x1 projection).

A ResNet encoder is torchvision's own module (minus ``fc``), so torchvision and MoCo v2 checkpoints load into it
unchanged and trained encoders export as plain torchvision state dicts. Every encoder returns C2..C5 (strides 4,
8, 16, 32) and every head reads them and names the output it adds (``output``); which heads a network has is its
method's choice (``methods``), not the network's.
"""

from __future__ import annotations

import math

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from . import vit

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")


def check_arch(arch: str) -> None:
    """A one-line ``ValueError`` for a name that is neither one of ``ARCHS`` nor a timm ViT (``vit``)."""
    if arch not in ARCHS and vit.timm_model(arch) is None:
        raise ValueError(f"arch={arch!r}: choose a ResNet ({', '.join(ARCHS)}) or {vit.choices_hint(arch)}")


def build_encoder(arch: str, dilate: bool = False, pad: bool = False) -> nn.Module:
    """The encoder ``arch`` names: ``ResNetEncoder`` or ``vit.ViTEncoder`` (``pad``: a ViT takes any image size,
    as a ResNet does; evaluation's images)."""
    check_arch(arch)
    return ResNetEncoder(arch, dilate) if arch in ARCHS else vit.ViTEncoder(arch, dilate, pad)


def size_multiple(arch: str) -> int:
    """What every view side must be a multiple of for ``arch``: a ResNet's stride 32, a ViT's patch."""
    check_arch(arch)
    return 32 if arch in ARCHS else vit.patch_size(arch)


class ResNetEncoder(nn.Module):
    """A torchvision ResNet returning C2..C5 (strides 4, 8, 16, 32; with ``dilate``, every stage after C2 is
    dilated instead of strided, so C2..C5 all come at stride 4: evaluation's ``c5`` read-out)."""

    def __init__(self, arch: str = "resnet50", dilate: bool = False):
        super().__init__()
        check_arch(arch)
        net = getattr(torchvision.models, arch)(weights=None,
                                                replace_stride_with_dilation=[True, True, True] if dilate else None)
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

    def load_encoder_state(self, state: dict, what: str) -> None:
        """Load a torchvision ResNet state dict, all of it (a classifier, ``fc.*``, is ignored)."""
        load_weights(self.net, state, what, optional=("fc.",))


class BilinearUp2(nn.Module):
    """2x bilinear upsampling (align_corners=False), the same as ``nn.Upsample(scale_factor=2, mode="bilinear")``.

    On CUDA the input is made channels_last first. The decoder's GroupNorm returns NCHW tensors, and CUDA's NCHW
    bilinear kernel gives one thread per output position that loops over every image and channel, which made
    these upsamplings the largest cost of the VADeR step on an H100 (benchmarks/RESULTS.md). The channels_last
    kernel gives a thread per output value.

    ``size``: the finer level's grid instead, when it is not twice this one (a ViT's pyramid of a view whose side
    is no multiple of 32); where it is twice, the result is the same."""

    def forward(self, x: torch.Tensor, size=None) -> torch.Tensor:
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        if size is not None and tuple(size) != (2 * x.shape[-2], 2 * x.shape[-1]):
            return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def _conv_gn_relu(cin: int, cout: int, groups: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cout), nn.ReLU(inplace=True)]


class FPNDecoder(nn.Module):
    """Top-down FPN over C2..C5, then per level (3x3 conv, GroupNorm, ReLU, 2x bilinear) blocks up to 1/4
    scale, summed, and a final 1x1 conv: the decoder of VADeR (the Panoptic FPN semantic branch)."""

    output = "dense"

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
        sizes = [f.shape[-2:] for f in feats]
        return self.out(sum(self._level(block, x, sizes[:level]) for level, (block, x) in
                            enumerate(zip(self.levels, p))))

    @staticmethod
    def _level(block: nn.Sequential, x: torch.Tensor, finer: list) -> torch.Tensor:
        """One level's blocks, each upsampling to the next finer level's grid (``finer``, finest first)."""
        for layer in block:
            x = layer(x, finer.pop()) if isinstance(layer, BilinearUp2) else layer(x)
        return x


class GlobalHead(nn.Sequential):
    """MoCo v2's two-layer projection MLP on globally pooled C5."""

    output = "global"

    def __init__(self, cin: int, hidden: int, cout: int):
        super().__init__(nn.Linear(cin, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, cout))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return super().forward(feats[-1].mean((2, 3)))


class DenseHead(nn.Sequential):
    """DenseCL's dense projection: the same MLP as 1x1 convolutions over C5's cells."""

    output = "dense"

    def __init__(self, cin: int, hidden: int, cout: int):
        super().__init__(nn.Conv2d(cin, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, cout, 1))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return super().forward(feats[-1])


class DenseNetwork(nn.Module):
    """An encoder and the heads its method gave it, each an attribute of its own name (checkpoints name their
    weights so). ``forward`` returns ``c5`` and each head's output, under the name the head gives it."""

    def __init__(self, encoder: nn.Module, heads: dict[str, nn.Module]):
        super().__init__()
        self.encoder = encoder
        self.heads = tuple(heads)
        for name, head in heads.items():
            setattr(self, name, head)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.encoder(x)
        out = {"c5": feats[-1]}
        for name in self.heads:
            head = getattr(self, name)
            out[head.output] = head(feats)
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
