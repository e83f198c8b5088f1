"""Frozen dense feature extractors for every compared model, so baselines go through the same protocol code.

    checkpoint:PATH   our training checkpoint or run folder (its objective's dense output, e.g. VADeR's FPN
                      embedding at stride 4; an objective without one, MoCo v2, as a global model, below)
    random:ARCH       randomly initialised VADeR network (encoder + decoder), seed 0
    torchvision:PATH  supervised ResNet weights (a torchvision state dict), as a global model
    mocov2:PATH       a MoCo v2 checkpoint (``module.encoder_q.*``), as a global model

Global models have no dense head: as in the VADeR paper, ResNet-50 is dilated so its last stage keeps stride 4
(``replace_stride_with_dilation``); ResNet-18/34 cannot be dilated in torchvision, so their C5 is upsampled to
stride 4 instead.

Every extractor is a module that moves its input to the device its weights are on, so callers can hand it
CPU tensors wherever the model lives.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from model import checkpoint
from model.builder import MoCo, MoCoConfig
from model.network import load_weights, read_encoder_state


class Extractor(nn.Module):
    """Base of the extractors: ``forward`` takes normalised images ``[B,3,H,W]`` on any device and returns
    ``[B,C,H/4,W/4]`` features on the extractor's device."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x.to(self.device, non_blocking=True))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class GlobalResNet(Extractor):
    """A classification ResNet's last stage as dense features at stride 4."""

    def __init__(self, arch: str, state: dict | None = None, what: str = "weights"):
        super().__init__()
        dilate = arch in ("resnet50", "resnet101", "resnet152")
        net = getattr(torchvision.models, arch)(weights=None,
                                                replace_stride_with_dilation=[True, True, True] if dilate else None)
        if state is not None:
            load_weights(net, state, what, optional=("fc.",))
        del net.fc
        self.net, self.dilated = net, dilate

    def features(self, x):
        n = self.net
        y = n.layer4(n.layer3(n.layer2(n.layer1(n.maxpool(n.relu(n.bn1(n.conv1(x))))))))
        if not self.dilated:
            y = F.interpolate(y, size=(x.shape[-2] // 4, x.shape[-1] // 4), mode="bilinear", align_corners=False)
        return y


class DenseOutput(Extractor):
    """One output of a ``DenseNetwork`` (the objective's ``dense_output``) as the features."""

    def __init__(self, net: nn.Module, output: str = "dense"):
        super().__init__()
        self.net, self.output = net, output

    def features(self, x):
        return self.net(x)[self.output]


def checkpoint_extractor(model: MoCo, name: str) -> tuple[str, Extractor]:
    """(display name, extractor) for a trained model, as its objective says its features are read."""
    output = model.objective.dense_output
    if output is None:
        return f"{name} (global)", GlobalResNet(model.cfg.arch, model.encoder_q.encoder.net.state_dict()).eval()
    return name, DenseOutput(model.encoder_q, output).eval()


def feature_extractor(spec: str, arch: str = "resnet50", device="cpu") -> tuple[str, Extractor]:
    """(display name, extractor on ``device``) for one ``KIND:ARG`` spec (module docstring)."""
    kind, _, arg = spec.partition(":")
    if kind == "checkpoint":
        path = checkpoint.find(arg)
        name, module = checkpoint_extractor(checkpoint.load_model(path), checkpoint.run_and_step(path))
    elif kind == "random":
        torch.manual_seed(0)
        name, module = "random init", DenseOutput(MoCo(MoCoConfig(arch=arg or arch)).encoder_q).eval()
    elif kind in ("torchvision", "mocov2"):
        name, module = f"{kind} {Path(arg).name}", GlobalResNet(arch, read_encoder_state(arg), arg).eval()
    else:
        raise ValueError(f"unknown feature spec {spec!r}: use checkpoint:PATH, random:ARCH, torchvision:PATH or "
                         "mocov2:PATH")
    return name, module.to(device)


def feature_extractors(specs: list[str], arch: str = "resnet50", device="cpu") -> dict[str, Extractor]:
    """Named extractors for a table; two specs that would share a row name are an error, not a lost row."""
    out = {}
    for spec in specs:
        name, module = feature_extractor(spec, arch, device)
        if name in out:
            raise ValueError(f"two --features would both be named {name!r} in the table ({spec!r} and an earlier "
                             "one): compare checkpoints of different runs or steps")
        out[name] = module
    return out
