"""Training configuration: one dataclass, overridable from YAML files and ``key=value`` arguments (OmegaConf).

    python -m densessl.train --config my.yaml objective=densecl arch=resnet50 batch_size=256 data=/data/imagenet/train

Every check that can fail is done here, before data is scanned or a model is built.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import List, Optional

from omegaconf import OmegaConf

from densessl.model.builder import MoCoConfig
from densessl.model.network import ARCHS
from densessl.model.objectives import OBJECTIVES
from densessl.pipeline import BACKENDS, PairSpec
INSTALL_HINTS = {
    "dali": ("nvidia.dali", "backend=dali needs NVIDIA DALI: pip install -e '.[dali]' (nvidia-dali-cuda130)"),
    "ffcv": ("ffcv", "backend=ffcv needs FFCV 1.0.2: apt-get install libturbojpeg0-dev libopencv-dev pkg-config, "
                     "then pip install -e '.[ffcv]' (or run make setup)"),
}


@dataclass
class TrainConfig:
    data: str = "synthetic"  # ImageFolder root, 'synthetic' for the embedded set, or a .beton (backend=ffcv)
    synthetic_dir: str = "data/synthetic"
    backend: str = "torch"  # 'torch' (reference CPU loader), 'dali' (GPU decode with a GPU, else CPU) or 'ffcv'
    ffcv_order: str = "random"  # FFCV order: random, quasi_random (data larger than RAM; one process) or sequential
    objective: str = "vader"
    arch: str = "resnet50"
    init_encoder: Optional[str] = None  # MoCo v2 or torchvision checkpoint for the encoder
    device: str = "auto"  # auto (the GPU of LOCAL_RANK when there is one), cuda or cpu
    view_size: int = 224
    crop_scale: List[float] = field(default_factory=lambda: [0.2, 1.0])  # RandomResizedCrop area fraction
    crop_ratio: List[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # RandomResizedCrop aspect ratio
    flip_p: float = 0.5
    feature_stride: int = 4  # view pixels per feature-grid cell (vader's decoder embeds at stride 4)
    batch_size: int = 256  # global, over all ranks
    workers: int = 8
    epochs: int = 200
    steps: int = 0  # > 0: stop after this many steps instead of `epochs`
    lr: float = 0.03  # encoder, for a global batch of 256 (scaled linearly)
    decoder_lr: float = 0.03  # decoder and projection heads, same scaling
    warmup_steps: int = 0
    sgd_momentum: float = 0.9
    weight_decay: float = 1e-4
    queue_size: int = 65536
    moco_momentum: float = 0.999
    temperature: Optional[float] = None  # default: 0.07 for vader, 0.2 otherwise
    num_matches: int = 32
    min_matches: int = 32
    max_tries: int = 50  # pair redraws before view 2 reuses view 1's window
    loss_scale: float = 10.0
    symmetric: bool = False
    negatives: str = "queue"  # vader: 'queue' of pixel keys, or 'image' (the same image's other cells)
    exclusion_radius: float = 2.0  # negatives=image: cells this near the positive are not negatives
    densecl_lambda: float = 0.5
    densecl_warmup_steps: int = 1000  # lambda is 0 before this step, as in DenseCL
    sync_bn: bool = False  # SyncBatchNorm (GPU DDP) instead of shuffle-BN
    amp: bool = True  # bf16 autocast on GPU
    channels_last: bool = True
    compile: bool = False
    cudnn_benchmark: bool = True  # GPU: cuDNN times its convolution algorithms once for our fixed shapes and
    # keeps the fastest (false: the default algorithms, for runs that must repeat bit for bit)
    sync_every: int = 1  # steps between host synchronisations (loss read, non-finite check, stop agreement)
    seed: int = 0
    run_dir: str = "runs/default"
    resume: str = ""  # '', 'auto' (latest in run_dir, if any) or a checkpoint path
    checkpoint_every: int = 500  # steps
    keep_checkpoints: int = 2  # newest checkpoints kept (>= 1)
    progress: bool = True  # a bar in a terminal; plain lines (every log_every steps / log_every_s) in a log file
    log_every: int = 20  # steps between plain log lines
    log_every_s: float = 60.0  # ... or seconds, whichever comes first
    tensorboard: bool = True  # TensorBoard event files in run_dir/tensorboard (rank 0)
    log_images_every: int = 500  # steps between pictures of the dense features in TensorBoard (and at the end)
    log_images: int = 4  # training images in those pictures (0: none)
    collective_timeout_s: int = 600  # a collective waiting longer fails, naming the ranks that fell behind
    on_nonfinite: str = "stop"  # NaN/inf loss: 'stop' (batch indices saved) or 'skip' the step (state restored)
    max_nonfinite_skips: int = 10  # with on_nonfinite=skip, one more stops the run
    max_bad_images: int = 100  # unreadable files are skipped and listed in run_dir/skipped.txt; more aborts

    def pair_spec(self) -> PairSpec:
        """The loader's view-pair spec (validated when built)."""
        return PairSpec(size=(self.view_size, self.view_size), scale=tuple(self.crop_scale),
                        ratio=tuple(self.crop_ratio), flip_p=self.flip_p, stride=self.feature_stride,
                        num_matches=self.num_matches, min_matches=self.min_matches, max_tries=self.max_tries)

    def model_config(self) -> MoCoConfig:
        """The model this configuration trains (saved in every checkpoint, so evaluation rebuilds it)."""
        return MoCoConfig(objective=self.objective, arch=self.arch, queue_size=self.queue_size,
                          momentum=self.moco_momentum, temperature=self.temperature, loss_scale=self.loss_scale,
                          symmetric=self.symmetric, negatives=self.negatives,
                          exclusion_radius=self.exclusion_radius, densecl_lambda=self.densecl_lambda,
                          densecl_warmup_steps=self.densecl_warmup_steps, shuffle_bn=not self.sync_bn)

    def validate(self, world_size: int = 1) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(self.objective in OBJECTIVES, f"objective={self.objective!r}: choose one of {', '.join(OBJECTIVES)}")
        need(self.arch in ARCHS, f"arch={self.arch!r}: choose one of {', '.join(ARCHS)}")
        need(self.backend in BACKENDS, f"backend={self.backend!r}: available backends are {', '.join(BACKENDS)}")
        need(self.device in ("auto", "cuda", "cpu"), f"device={self.device!r}: choose auto, cuda or cpu")
        if self.backend in INSTALL_HINTS:
            module, hint = INSTALL_HINTS[self.backend]
            need(importlib.util.find_spec(module.split(".")[0]) is not None
                 and importlib.util.find_spec(module) is not None, hint)
        need(self.ffcv_order in ("random", "quasi_random", "sequential"),
             f"ffcv_order={self.ffcv_order!r}: choose random, quasi_random or sequential")
        need(not (self.backend == "ffcv" and self.ffcv_order == "quasi_random" and world_size > 1),
             "ffcv_order=quasi_random is not available with several processes in FFCV 1.0.2: use ffcv_order=random")
        need(self.view_size % 32 == 0, f"view_size={self.view_size} must be a multiple of 32 (the encoder stride)")
        need(self.batch_size % world_size == 0,
             f"batch_size={self.batch_size} is not divisible by the world size {world_size}")
        self.pair_spec()  # raises ValueError naming what is wrong with the views and matches
        objective = OBJECTIVES[self.objective]
        need(objective.dense_stride in (None, self.feature_stride),
             f"feature_stride={self.feature_stride}: objective={self.objective} embeds pixels at stride "
             f"{objective.dense_stride}, so its matches must index that grid; set feature_stride="
             f"{objective.dense_stride}")
        keys = self.batch_size * objective.keys_per_pair(self.num_matches, self.symmetric)
        need(self.queue_size % keys == 0, f"queue_size={self.queue_size} is not a multiple of the {keys} keys "
             f"enqueued per step (global batch x matches); pick e.g. {keys * max(1, self.queue_size // keys)}")
        need(self.sync_every >= 1, f"sync_every={self.sync_every} must be >= 1 (steps)")
        need(self.checkpoint_every >= 1, f"checkpoint_every={self.checkpoint_every} must be >= 1 (steps)")
        need(self.keep_checkpoints >= 1, f"keep_checkpoints={self.keep_checkpoints} must be >= 1")
        need(self.log_every >= 1 and self.log_images_every >= 1 and self.log_images >= 0 and self.log_every_s > 0,
             "log_every, log_images_every and log_every_s must be positive, log_images >= 0")
        need(self.negatives in ("queue", "image") and (self.negatives == "queue" or self.objective == "vader"),
             f"negatives={self.negatives!r}: 'queue', or 'image' with objective=vader")
        need(0 <= self.moco_momentum < 1, f"moco_momentum={self.moco_momentum} must be in [0, 1)")
        need(self.on_nonfinite in ("stop", "skip"), f"on_nonfinite={self.on_nonfinite!r}: choose stop or skip")
        need(self.max_bad_images >= 0, f"max_bad_images={self.max_bad_images} must be >= 0")
        need(self.steps > 0 or self.epochs > 0, "set epochs or steps to a positive number")
        need(self.resume in ("", "auto") or Path(self.resume).is_file(),
             f"resume={self.resume!r}: no such checkpoint file (use 'auto' or a path)")
        need(self.init_encoder is None or Path(self.init_encoder).is_file(),
             f"init_encoder={self.init_encoder!r}: no such file")
        if self.data.endswith(".beton"):
            need(self.backend == "ffcv", f"data={self.data!r} is an FFCV .beton: set backend=ffcv")
            need(Path(self.data).is_file(), f"data={self.data!r}: no such file")
        else:
            need(self.data == "synthetic" or Path(self.data).is_dir(), f"data={self.data!r}: no such folder")


def parse(argv: list[str] | None = None) -> TrainConfig:
    """``[--config FILE.yaml ...] [key=value ...]``: later sources override earlier ones."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        for f in fields(TrainConfig):
            print(f"  {f.name}={f.default_factory() if f.default is MISSING else f.default}")
        raise SystemExit(0)
    merged = OmegaConf.structured(TrainConfig)
    while "--config" in argv:
        i = argv.index("--config")
        merged = OmegaConf.merge(merged, OmegaConf.load(argv[i + 1]))
        del argv[i:i + 2]
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise SystemExit(f"error: expected key=value overrides, got {bad}")
    merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(argv))
    return OmegaConf.to_object(merged)


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
