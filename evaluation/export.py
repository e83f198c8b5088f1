"""Export trained weights for downstream frameworks.

    python -m densessl.evaluation export --checkpoint runs/vader/checkpoints/step_00100000.pt --out exported/

writes, for a ResNet, ``encoder_torchvision.pth`` (a plain torchvision ResNet state dict, no ``fc``),
``encoder_detectron2.pkl`` (detectron2's naming, numpy arrays, ``matching_heuristics`` set so detectron2 maps any
leftover names) with ``encoder_detectron2.yaml`` beside it; for a ViT, ``encoder_timm.pth`` with
``encoder_timm.json``, the ``timm.create_model(model_name, **kwargs)`` call whose model loads it strictly; and
each head of the model's method on its own, by its name (VADeR's FPN decoder as ``decoder.pth``).

The weights are torchvision's ResNet trained on RGB images in [0, 1] normalised by ImageNet's mean and std.
detectron2's defaults are its own MSRA ResNet: stride in the 1x1 convolution, BGR input, mean-only
normalisation in 0-255 units. With those defaults the weights load without a warning and compute something
else, so the YAML holds the config lines that make detectron2 compute what was trained.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch

from densessl.model import checkpoint, vit

_D2_RULES = [  # torchvision name -> detectron2 name, applied in order
    (r"^conv1\.", "stem.conv1."),
    (r"^bn1\.", "stem.conv1.norm."),
    (r"^layer(\d)\.(\d+)\.downsample\.0\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut."),
    (r"^layer(\d)\.(\d+)\.downsample\.1\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.norm."),
    (r"^layer(\d)\.(\d+)\.conv(\d)\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}."),
    (r"^layer(\d)\.(\d+)\.bn(\d)\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm."),
]


def detectron2_name(name: str) -> str:
    for pattern, replacement in _D2_RULES:
        new = re.sub(pattern, replacement, name)
        if new != name:
            return new
    raise ValueError(f"no detectron2 name for {name!r}")


def to_detectron2(torchvision_state: dict) -> dict:
    """The pickle content detectron2's ``DetectionCheckpointer`` loads for a ResNet backbone."""
    model = {detectron2_name(k): v.detach().cpu().numpy() for k, v in torchvision_state.items()
             if not k.endswith("num_batches_tracked") and not k.startswith("fc.")}
    return {"model": model, "__author__": "densessl", "matching_heuristics": True}


# ImageNet's mean and std (pipeline.augment's, in 0-255 units, RGB order): what the encoder was trained on.
DETECTRON2_CONFIG = """# Merge into your detectron2 config: the weights are a torchvision ResNet trained on normalised RGB.
MODEL:
  WEIGHTS: encoder_detectron2.pkl
  PIXEL_MEAN: [{mean}]
  PIXEL_STD: [{std}]
  RESNETS:
    STRIDE_IN_1X1: False
INPUT:
  FORMAT: RGB
"""


def detectron2_config() -> str:
    from densessl.pipeline.augment import IMAGENET_MEAN, IMAGENET_STD
    return DETECTRON2_CONFIG.format(mean=", ".join(f"{255 * m:.3f}" for m in IMAGENET_MEAN),
                                    std=", ".join(f"{255 * s:.3f}" for s in IMAGENET_STD))


def timm_call(arch: str) -> dict:
    """The ``timm.create_model`` arguments whose model loads ``encoder_timm.pth`` as it is (no classifier)."""
    name, kwargs = vit.timm_model(arch)
    return {"model_name": name, "kwargs": {**kwargs, "num_classes": 0, "dynamic_img_size": True}}


def export(path: str | Path, out: str | Path) -> list[Path]:
    """Write the encoder (a ResNet: torchvision, detectron2; a ViT: timm) and the heads (VADeR's decoder,
    projection MLPs) of a checkpoint or run."""
    model = checkpoint.load_model(path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    encoder = model.encoder_q.encoder.net.state_dict()
    if vit.timm_model(model.cfg.arch):
        written = [out / "encoder_timm.pth", out / "encoder_timm.json"]
        torch.save(encoder, written[0])
        written[1].write_text(json.dumps(timm_call(model.cfg.arch), indent=2) + "\n")
    else:
        written = [out / "encoder_torchvision.pth", out / "encoder_detectron2.pkl", out / "encoder_detectron2.yaml"]
        torch.save(encoder, written[0])
        with open(written[1], "wb") as f:
            pickle.dump(to_detectron2(encoder), f)
        written[2].write_text(detectron2_config())
    for name in model.encoder_q.heads:  # the method's heads, each by its name (VADeR: decoder.pth)
        written.append(out / f"{name}.pth")
        torch.save(getattr(model.encoder_q, name).state_dict(), written[-1])
    return written
