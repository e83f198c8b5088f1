"""Frozen dense feature extractors for every compared model, so baselines go through the same protocol code.

    checkpoint:PATH   our training checkpoint (VADeR: the FPN decoder's 1/4-scale embedding; DenseCL: its dense
                      head; MoCo v2 objective: the encoder as a global model, below)
    random:ARCH       randomly initialised VADeR network (encoder + decoder), seed 0
    torchvision:PATH  supervised ResNet weights (a torchvision state dict), as a global model
    mocov2:PATH       a MoCo v2 checkpoint (``module.encoder_q.*``), as a global model

Global models have no dense head: as in the VADeR paper, ResNet-50 is dilated so its last stage keeps stride 4
(``replace_stride_with_dilation``); ResNet-18/34 cannot be dilated in torchvision, so their C5 is upsampled to
stride 4 instead.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from model.builder import MoCo, MoCoConfig
from model.network import read_encoder_state


class GlobalResNet(nn.Module):
    """A classification ResNet's last stage as dense features at stride 4."""

    def __init__(self, arch: str, state: dict | None = None):
        super().__init__()
        dilate = arch in ("resnet50", "resnet101", "resnet152")
        net = getattr(torchvision.models, arch)(weights=None,
                                                replace_stride_with_dilation=[True, True, True] if dilate else None)
        if state is not None:
            try:
                missing, unexpected = net.load_state_dict(state, strict=False)
            except RuntimeError as err:  # shape mismatch: weights of another architecture
                raise ValueError(f"weights do not fit {arch}: {str(err).splitlines()[1].strip()} ...") from None
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing or [k for k in unexpected if not k.startswith("fc.")]:
                raise ValueError(f"weights do not fit {arch}: missing {missing[:4]}, unexpected {unexpected[:4]}")
        del net.fc
        self.net, self.dilated = net, dilate

    def forward(self, x):
        n = self.net
        y = n.layer4(n.layer3(n.layer2(n.layer1(n.maxpool(n.relu(n.bn1(n.conv1(x))))))))
        if not self.dilated:
            y = F.interpolate(y, size=(x.shape[-2] // 4, x.shape[-1] // 4), mode="bilinear", align_corners=False)
        return y


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run folder (its newest checkpoint)."""
    path = Path(path)
    if path.is_dir():
        from train.checkpoint import checkpoints
        found = checkpoints(path / "checkpoints") or checkpoints(path)
        if not found:
            raise FileNotFoundError(f"no checkpoints in {path}")
        return found[-1]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint or run folder")
    return path


def load_checkpoint_model(path: str | Path) -> MoCo:
    """Our training checkpoint (or a run folder's newest) as a MoCo model, config read from the checkpoint."""
    path = resolve_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{path} is not a densessl training checkpoint (no 'model'/'config')")
    c = state["config"]
    model = MoCo(MoCoConfig(objective=c["objective"], arch=c["arch"], queue_size=c["queue_size"]))
    model.load_state_dict(state["model"])
    return model.eval()


def feature_extractor(spec: str, arch: str = "resnet50") -> tuple[str, nn.Module]:
    """(display name, module mapping normalised images ``[B,3,H,W]`` to ``[B,C,H/4,W/4]`` features)."""
    kind, _, arg = spec.partition(":")
    if kind == "checkpoint":
        arg = str(resolve_checkpoint(arg))
        model = load_checkpoint_model(arg)
        net = model.encoder_q
        if model.cfg.objective == "mocov2":
            return f"{Path(arg).name} (global)", GlobalResNet(model.cfg.arch, net.encoder.net.state_dict()).eval()
        return Path(arg).name, _DenseOutput(net).eval()
    if kind == "random":
        torch.manual_seed(0)
        return "random init", _DenseOutput(MoCo(MoCoConfig(arch=arg or arch)).encoder_q).eval()
    if kind in ("torchvision", "mocov2"):
        return f"{kind} {Path(arg).name}", GlobalResNet(arch, read_encoder_state(arg)).eval()
    raise ValueError(f"unknown feature spec {spec!r}: use checkpoint:PATH, random:ARCH, torchvision:PATH or "
                     "mocov2:PATH")


class _DenseOutput(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)["dense"]
