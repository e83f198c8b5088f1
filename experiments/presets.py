"""The comparison's presets: the encoder, the budgets (``PRESETS``), the reviewers' ablations (``ABLATIONS``), the
tiny set the tests use, and the one training configuration every run of the comparison (and the demo) starts
from (``base_config``)."""

from __future__ import annotations

import os
from pathlib import Path

from densessl.evaluation.depth_bound import BOUND_STEPS
from densessl.model.builder import ModelConfig
from densessl.model.methods import method_config
from densessl.pipeline import DataConfig, PairSpec
from densessl.pipeline.synthetic import SyntheticConfig
from densessl.pipeline.views import MultiCropViews
from densessl.train.config import OptimConfig, RunConfig, TrainConfig

ARCH = "resnet18"  # the encoder of every objective but the ViT ones
VIT_ARCH = "vit_tiny_patch8_224"  # ``<objective>_vit``'s: ViT-Ti with 8-pixel patches (a 64-pixel view: 8x8 tokens)
TINY_DATA = SyntheticConfig(height=96, width=128, train_per_class=4, val_per_class=2, videos=1, frames=4)  # tests
# --tiny (the tests, seconds): these where no flag is given, on TINY_DATA
TINY = {"seeds": [0], "steps": 4, "batch": 8, "view_size": 64, "objectives": ["vader", "mocov2", "vader_multicrop"],
        "bound_steps": 2}
NAMES = {"vader": "VADeR", "densecl": "DenseCL", "mocov2": "MoCo v2", "vader_multicrop": "VADeR multi-crop",
         "vader_vit": "VADeR ViT-Ti/8", "mocov2_vit": "MoCo v2 ViT-Ti/8"}
RANDOM_NAMES = {ARCH: "random init", VIT_ARCH: "random init ViT-Ti/8"}  # each encoder's random baseline
# (metric, higher is better, title): what the verdict, the ablations' differences and the plot's panels read
METRICS = (("mIoU", True, "segmentation mIoU ↑"), ("J&F", True, "propagation J&F ↑"),
           ("RMSE", False, "depth RMSE (m) ↓"), ("top-1", True, "shape classification top-1 ↑"))
# The budgets: 'cpu' is the one chosen for a 2-core machine from the margin-against-steps curve (README: at 400
# steps VADeR separates from every random read-out on segmentation, propagation and depth over three seeds, while
# at 200, seed 0, it is behind on depth). It runs on a GPU where there is one; 'gpu' is the larger one for a GPU
# machine. Seeds per mode.
PRESETS = {
    "cpu": {"steps": 400, "batch": 32, "view_size": 64, "workers": 2, "device": "auto", "bound_steps": BOUND_STEPS,
            "objectives": ["vader", "densecl", "mocov2", "vader_vit", "mocov2_vit"],  # VADeR multi-crop's step is
            # ~20x slower here: its queue holds 8 batches of its 288 keys per image (RESULTS.md)
            "seeds": {"compare": [0, 1, 2], "ablations": [0, 1], "curve": [0]}},
    "gpu": {"steps": 1600, "batch": 32, "view_size": 96, "workers": max(2, (os.cpu_count() or 4) - 2), "device": "cuda",
            "bound_steps": BOUND_STEPS,
            "objectives": list(NAMES), "seeds": {"compare": [0, 1, 2], "ablations": [0, 1, 2], "curve": [0]}},
}
# The reviewers' questions: the objective each row trains and its configuration keys ('init MoCo v2' reads the
# encoder of this comparison's own MoCo v2 run of the same seed: the paper starts VADeR from MoCo v2 weights).
ABLATIONS = {
    "VADeR": ("vader", {}),
    "negatives: same image (r=2)": ("vader", {"method.negatives": "image", "method.exclusion_radius": 2.0}),
    "queue 1,024": ("vader", {"method.queue_size": 1024}),
    "no momentum encoder": ("vader", {"method.momentum": 0.0}),
    "no momentum encoder, in-batch negatives (SimCLR-style)": ("vader", {"method.momentum": 0.0,
                                                                         "method.negatives": "batch"}),
    "Table 3: unmatched positives": ("vader", {"method.positives": "unmatched"}),
    "Table 3: same view": ("vader", {"views.same_window": True}),
    "8 matches per pair": ("vader", {"views.num_matches": 8}),
    "init MoCo v2": ("vader", {"model.init_encoder": "mocov2"}),
    # R2: MoCo v2 for VADeR's extra steps from the same start; R3: instance-level MoCo v2 on VADeR's crops
    "R2: MoCo v2 continued from MoCo v2": ("mocov2", {"model.init_encoder": "mocov2"}),
    "R3: MoCo v2 on VADeR multi-crop's crops": ("mocov2_multicrop", {}),
}


def multicrop_views(view_size: int) -> MultiCropViews:
    """VADeR multi-crop at the comparison's budget: 2 global views of ``view_size`` and 4 local views of about 0.43
    of it (DINO's 96 / 224), a multiple of 32 (the encoder's stride)."""
    local = max(32, round(view_size * 96 / 224 / 32) * 32)
    return MultiCropViews(f"2x{view_size},4x{local}")


def arch_of(objective: str) -> str:
    """The encoder an objective trains: ``VIT_ARCH`` for ``<method>_vit``, else ``ARCH``."""
    return VIT_ARCH if objective.endswith("_vit") else ARCH


def base_config(data: Path, args, method: str = "vader") -> TrainConfig:
    """One run of the comparison (and the demo): resnet18, ``args``' steps, batch, views and device, a queue of 8
    batches of keys, cosine schedule after a short warm-up, DenseCL's dense term from a tenth of the steps.
    ``<method>_multicrop`` is the method on ``multicrop_views``, and ``<method>_vit`` the method on ``VIT_ARCH``,
    with the same budget."""
    arch, method = arch_of(method), method.removesuffix("_vit")
    extra = {"warmup_steps": args.steps // 10} if method == "densecl" else {}
    crops = method.endswith("_multicrop")
    views = multicrop_views(args.view_size) if crops else PairSpec(size=args.view_size)
    method = method.removesuffix("_multicrop")
    keys = 32 if not crops else sum(rule.num_matches for _, _, rule in views.view_spec.pairs())  # VADeR's, to size the
    # queue alike for every method (a multiple of what any of them enqueues: one key per matched pair, or its matches)
    return TrainConfig(
        data=DataConfig(path=str(data / "train"), workers=args.workers), views=views,
        model=ModelConfig(arch=arch), method=method_config(method, queue_size=args.batch * keys * 8, **extra),
        optim=OptimConfig(batch_size=args.batch, steps=args.steps, lr=0.3, decoder_lr=0.3,
                          warmup_steps=min(20, args.steps // 10)),
        run=RunConfig(checkpoint_every=max(1, args.steps // 2), keep_checkpoints=1, resume="auto", device=args.device,
                      progress=False, log_images=0))  # keep 1: a run is read at its newest step only (disk: README)


def budget(args) -> str:
    """The folder name of one pretraining budget: runs of different budgets never resume into each other."""
    return f"{ARCH}_{args.steps}steps_batch{args.batch}_{args.view_size}px"
