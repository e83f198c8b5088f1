"""Frozen dense feature extractors for every compared model, so baselines go through the same protocol code.

A model is named by a spec:

    checkpoint:PATH   our training checkpoint or run folder
    random:ARCH       randomly initialised VADeR network (encoder + decoder), seed 0 (``random:ARCH@SEED``)
    torchvision:PATH  supervised ResNet weights (a torchvision state dict)
    timm:PATH         ViT weights of timm, DINO or DINOv2 (``--arch`` names the timm ViT)
    mocov2:PATH       a MoCo v2 checkpoint (``module.encoder_q.*``; DenseCL and MoCo v3 files load too)

and each model is read as one or more kinds of features (``KINDS``), so models are compared on equal footing:

    hypercolumn  the encoder's C2..C5, each upsampled to stride 4 and L2-normalised, concatenated: the same
                 read-out for every model, whatever its method trained
    dense        the method's own dense output (VADeR's FPN embedding at stride 4, DenseCL's dense head
                 upsampled from stride 32); models without one (MoCo v2, supervised weights) have no such row
    c5           the last stage at stride 4: dilated for ResNet-50 and deeper, as in the VADeR paper
                 (``replace_stride_with_dilation``); upsampled from stride 32 for ResNet-18/34, which torchvision
                 cannot dilate; a ViT's last block's patch tokens, upsampled

Every extractor is a module that moves its input to the device its weights are on, so callers can hand it
CPU tensors wherever the model lives.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from densessl.model import checkpoint, vit
from densessl.model.builder import MoCo, ModelConfig
from densessl.model.methods import method_config
from densessl.model.network import build_encoder

KINDS = ("hypercolumn", "dense", "c5")
FOREIGN_WEIGHTS = ("torchvision", "mocov2", "timm")  # the specs of other projects' weights (file formats)


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


def _encoder(arch: str, state: dict, what: str, dilate: bool = False) -> torch.nn.Module:
    """The model's encoder (``network.build_encoder``; a ViT pads images to its patch) holding all of ``state``
    (checked; a classifier is ignored)."""
    encoder = build_encoder(arch, dilate, pad=True)
    encoder.load_encoder_state(state, what)
    return encoder


def _at_stride4(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    size = (x.shape[-2] // 4, x.shape[-1] // 4)
    return y if y.shape[-2:] == size else F.interpolate(y, size=size, mode="bilinear", align_corners=False)


class LastStage(Extractor):
    """An encoder's last stage as dense features at stride 4 (the ``c5`` kind): dilated where torchvision can,
    a ViT's patch tokens upsampled."""

    def __init__(self, arch: str, state: dict, what: str = "weights"):
        super().__init__()
        self.dilated = arch not in ("resnet18", "resnet34")
        self.net = _encoder(arch, state, what, self.dilated)

    def features(self, x):
        return _at_stride4(self.net(x)[-1], x)


class Hypercolumn(Extractor):
    """C2..C5, each upsampled to stride 4 and L2-normalised over channels, concatenated (the ``hypercolumn``
    kind): no stage dominates by its scale, and every model is read out the same way."""

    def __init__(self, arch: str, state: dict, what: str = "weights"):
        super().__init__()
        self.net = _encoder(arch, state, what)

    def features(self, x):
        return torch.cat([F.normalize(_at_stride4(c, x), dim=1) for c in self.net(x)], 1)


class DenseOutput(Extractor):
    """One output of a ``DenseNetwork`` (its method's ``dense_output``) as the features."""

    def __init__(self, net: nn.Module, output: str = "dense"):
        super().__init__()
        self.net, self.output = net, output

    def features(self, x):
        return self.net(x)[self.output]


def _check_kinds(kinds) -> None:
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"feature kinds {list(kinds)}: choose from {', '.join(KINDS)}")


def encoder_extractors(arch: str, state: dict, what: str, kinds=KINDS) -> dict[str, Extractor]:
    """The encoder-only kinds (``hypercolumn``, ``c5``) of an encoder state dict (ResNet or ViT), by kind."""
    _check_kinds(kinds)
    build = {"hypercolumn": Hypercolumn, "c5": LastStage}
    return {k: build[k](arch, state, what).eval() for k in kinds if k in build}


def model_extractors(model: MoCo, kinds=KINDS) -> dict[str, Extractor]:
    """Each asked-for kind a trained (or random) model has, by kind: the encoder's kinds, and ``dense`` where
    its method has a dense output. The query encoder is read, as the projects we compare with do."""
    out = encoder_extractors(model.cfg.arch, model.encoder_q.encoder.net.state_dict(), "the model's encoder", kinds)
    if "dense" in kinds and model.method.dense_output is not None:
        if hasattr(model.encoder_q.encoder, "pad"):  # a ViT reads evaluation's images of any size
            model.encoder_q.encoder.pad = True
        out["dense"] = DenseOutput(model.encoder_q, model.method.dense_output).eval()
    return {k: out[k] for k in kinds if k in out}


def random_model(arch: str, seed: int = 0) -> MoCo:
    """A randomly initialised network of the default method (VADeR): the random baseline (encoder kinds, and an
    FPN as its ``dense``)."""
    torch.manual_seed(seed)
    return MoCo(ModelConfig(arch=arch), method_config(queue_size=128)).eval()


def feature_extractor(spec: str, arch: str = "resnet50", device="cpu", kinds=KINDS,
                      name_arch: bool = False) -> dict[str, Extractor]:
    """Extractors on ``device`` for one ``SPEC:ARG`` (module docstring), by row name ``model [kind]``; a kind
    the model does not have has no row. A random model's name carries its arch where ``name_arch`` says so."""
    source, _, arg = spec.partition(":")
    if source == "checkpoint":
        path = checkpoint.find(arg)
        name, found = checkpoint.run_and_step(path), model_extractors(checkpoint.load_model(path), kinds)
    elif source == "random":
        arch_arg, _, seed = arg.partition("@")
        name = "random init" + (f" {arch_arg or arch}" if name_arch else "") + (f" seed {seed}" if seed else "")
        found = model_extractors(random_model(arch_arg or arch, int(seed or 0)), kinds)
    elif source in FOREIGN_WEIGHTS:
        if source == "timm" and vit.timm_model(arch) is None:
            raise ValueError(f"{spec}: --arch={arch!r} is no timm ViT: name the file's model, e.g. --arch "
                             "vit_small_patch16_224 (DINO ViT-S/16) or vit_small_patch14_dinov2 (DINOv2 ViT-S/14)")
        name = f"{source} {Path(arg).name}"
        found = encoder_extractors(arch, checkpoint.read_encoder_state(arg), arg, kinds)
    else:
        raise ValueError(f"unknown feature spec {spec!r}: use checkpoint:PATH, random:ARCH, torchvision:PATH, "
                         "mocov2:PATH or timm:PATH")
    if not found:
        raise ValueError(f"{spec}: has none of the feature kinds {list(kinds)} (a global model has no 'dense')")
    return {f"{name} [{kind}]": module.to(device) for kind, module in found.items()}


def feature_extractors(specs: list[str], arch: str = "resnet50", device="cpu", kinds=KINDS) -> dict[str, Extractor]:
    """Named extractors for a table; two specs that would share a row name are an error, not a lost row.
    Random rows carry their arch only where the table holds random models of more than one arch."""
    random_archs = {s.partition(":")[2].partition("@")[0] or arch for s in specs if s.startswith("random:")}
    out = {}
    for spec in specs:
        for name, module in feature_extractor(spec, arch, device, kinds, len(random_archs) > 1).items():
            if name in out:
                raise ValueError(f"two --features would both be named {name!r} in the table ({spec!r} and an "
                                 "earlier one): compare checkpoints of different runs or steps")
            out[name] = module
    return out
