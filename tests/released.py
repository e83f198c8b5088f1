"""Checkpoint files as other projects save them (MoCo v2 and v3, DenseCL, torchvision), for loading tests."""

import torch


def released_checkpoints(source: torch.nn.Module, other: torch.nn.Module, folder) -> dict:
    """Checkpoints in the formats their projects save, around ``source``'s weights as the query encoder and
    ``other``'s as everything else (momentum encoder, duplicates), so a load that takes the wrong keys shows."""
    q = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    k = {k: v for k, v in other.state_dict().items() if not k.startswith("fc.")}
    mlp = {"fc.0.weight": torch.randn(512, 512), "fc.0.bias": torch.randn(512), "fc.2.weight": torch.randn(128, 512),
           "fc.2.bias": torch.randn(128)}
    formats = {
        "torchvision.pth": source.state_dict(),
        # facebookresearch/moco main_moco.py: DDP-wrapped MoCo (both encoders with their MLP heads, the queue)
        "moco_v2.pth.tar": {"epoch": 200, "arch": "resnet18", "optimizer": {"state": {}, "param_groups": []},
                            "state_dict": {**{f"module.encoder_q.{n}": v for n, v in {**q, **mlp}.items()},
                                           **{f"module.encoder_k.{n}": v for n, v in {**k, **mlp}.items()},
                                           "module.queue": torch.randn(128, 256),
                                           "module.queue_ptr": torch.zeros(1, dtype=torch.long)}},
        # facebookresearch/moco-v3 main_moco.py: base and momentum encoders (projector as fc), predictor
        "moco_v3.pth.tar": {"epoch": 100, "arch": "resnet18",
                            "state_dict": {**{f"module.base_encoder.{n}": v for n, v in {**q, **mlp}.items()},
                                           **{f"module.momentum_encoder.{n}": v for n, v in {**k, **mlp}.items()},
                                           "module.predictor.0.weight": torch.randn(512, 128)}},
        # DenseCL (OpenSelfSup): encoder_q = Sequential(backbone, neck), encoder_k alike, queues
        "densecl.pth": {"meta": {"epoch": 200}, "state_dict": {
            **{f"encoder_q.0.{n}": v for n, v in q.items()}, **{f"encoder_k.0.{n}": v for n, v in k.items()},
            "encoder_q.1.mlp.0.weight": torch.randn(512, 512), "queue": torch.randn(128, 256),
            "queue2": torch.randn(128, 256), "queue_ptr": torch.zeros(1, dtype=torch.long)}},
    }
    for name, state in formats.items():
        torch.save(state, folder / name)
    return formats
