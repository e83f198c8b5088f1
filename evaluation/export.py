"""Export trained weights for downstream frameworks.

    python -m evaluation export --checkpoint runs/vader/checkpoints/step_00100000.pt --out exported/

writes ``encoder_torchvision.pth`` (a plain torchvision ResNet state dict, no ``fc``), ``encoder_detectron2.pkl``
(detectron2's naming, numpy arrays, ``matching_heuristics`` set so detectron2 maps any leftover names) and, for
VADeR, ``decoder.pth`` (the FPN decoder on its own).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from model import checkpoint

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


def export(path: str | Path, out: str | Path) -> list[Path]:
    """Write the encoder (torchvision, detectron2) and, when there is one, the decoder of a checkpoint or run."""
    model = checkpoint.load_model(path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    encoder = model.encoder_q.encoder.net.state_dict()
    written = [out / "encoder_torchvision.pth", out / "encoder_detectron2.pkl"]
    torch.save(encoder, written[0])
    with open(written[1], "wb") as f:
        pickle.dump(to_detectron2(encoder), f)
    if model.encoder_q.decoder is not None:
        written.append(out / "decoder.pth")
        torch.save(model.encoder_q.decoder.state_dict(), written[-1])
    return written
