"""timm Vision Transformers as encoders: the same four-level pyramid the heads read from a ResNet (strides 4, 8, 16
and 32), made from the last block's patch tokens, as ViTDet's simple feature pyramid does.

The pyramid has no weights of its own: the token map (stride = the patch) is resampled to each level's grid,
bilinearly up to the finer levels and by average pooling down to the coarser ones. The learned layers on top of it
are the heads' (the FPN decoder has a 1x1 lateral and conv-GroupNorm-ReLU blocks per level). So the encoder's
weights are exactly timm's: ``init_encoder`` loads all of it from a timm, DINO or DINOv2 file, export writes a
state dict ``timm.create_model`` loads, and evaluation's read-outs of foreign weights hold no random layer.

Names are timm's ``vision_transformer`` models (``timm.list_models(module="vision_transformer")``), built with
``pretrained=False`` (nothing is downloaded), no classifier and ``dynamic_img_size``: every view size that is a
multiple of the patch runs, the position embeddings interpolated from the model's own grid. A timm name with
another patch number (``vit_tiny_patch8_224``, from ``vit_tiny_patch16_224``) builds that model with that patch.
"""

from __future__ import annotations

import difflib
import functools
import re
import warnings

import torch
from torch import nn
from torch.nn import functional as F

STRIDES = (4, 8, 16, 32)
EXAMPLES = ("vit_tiny_patch16_224", "vit_tiny_patch8_224", "vit_small_patch16_224", "vit_small_patch8_224",
            "vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2", "vit_base_patch16_224")


@functools.cache
def timm_names() -> tuple[str, ...]:
    import timm
    return tuple(timm.list_models(module="vision_transformer"))


@functools.cache
def timm_model(arch: str) -> tuple[str, dict] | None:
    """``(timm name, create_model keyword arguments)`` for a ViT ``arch``, or None when it names no timm ViT."""
    if not arch.startswith("vit_"):
        return None
    if arch in timm_names():
        return arch, {}
    found = re.fullmatch(r"(.*_patch)(\d+)(_.*)?", arch)
    if found:
        pattern = re.compile(re.escape(found[1]) + r"\d+" + re.escape(found[3] or ""))
        base = next((n for n in timm_names() if pattern.fullmatch(n)), None)
        if base:
            return base, {"patch_size": int(found[2])}
    return None


def choices_hint(arch: str) -> str:
    """The ViT part of a bad architecture's one-line error: examples, where the full list is, and close names."""
    close = difflib.get_close_matches(arch, list(dict.fromkeys(timm_names() + EXAMPLES)), n=3, cutoff=0.6)
    return (f"a timm ViT such as {', '.join(EXAMPLES)} (the {len(timm_names())} of "
            "timm.list_models(module='vision_transformer'), or one of them with another patch number)"
            + (f"; closest: {', '.join(close)}" if close else ""))


def create(arch: str) -> nn.Module:
    import timm
    name, kwargs = timm_model(arch)
    return timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs)


@functools.cache
def patch_size(arch: str) -> int:
    """The patch of a ViT ``arch`` (built on the meta device: no memory, no weights)."""
    with torch.device("meta"):
        size = create(arch).patch_embed.patch_size
    if size[0] != size[1]:
        raise ValueError(f"arch={arch!r}: patches of {size[0]}x{size[1]} pixels; only square patches are supported")
    return size[0]


class ViTEncoder(nn.Module):
    """A timm ViT returning the pyramid C2..C5 (strides 4, 8, 16, 32) of its last block's patch tokens (module
    docstring). With ``dilate`` every level is at stride 4 (the ``c5`` read-out: the tokens upsampled), as a
    dilated ResNet's are.

    A view whose size is not a multiple of the patch raises a one-line ``ValueError``, unless ``pad``: then it
    is zero-padded at the bottom and right to the next multiple, and the levels are cropped back to the view
    (evaluation's images come in any size)."""

    def __init__(self, arch: str, dilate: bool = False, pad: bool = False):
        super().__init__()
        self.arch, self.dilate, self.pad = arch, dilate, pad
        self.net = create(arch)
        self.patch = self.net.patch_embed.patch_size[0]
        self.channels = (self.net.embed_dim,) * len(STRIDES)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, w = x.shape[-2:]
        p = self.patch
        if h % p or w % p:
            if not self.pad:
                raise ValueError(f"a view of {h}x{w} pixels is not a multiple of {self.arch}'s {p}-pixel patch; "
                                 f"nearest valid sizes: {nearest_sizes(h, p)} x {nearest_sizes(w, p)}")
            x = F.pad(x, (0, -w % p, 0, -h % p))
        tokens = self.net.forward_features(x)[:, self.net.num_prefix_tokens:]
        grid = tokens.transpose(1, 2).reshape(x.shape[0], -1, x.shape[-2] // p, x.shape[-1] // p)
        return [_resample(grid, (max(1, h // s), max(1, w // s)), p, s)
                for s in ((4,) * len(STRIDES) if self.dilate else STRIDES)]

    def load_encoder_state(self, state: dict, what: str) -> None:
        """Load a ViT state dict of timm, DINO or DINOv2 (timm's own conversion: DINOv2's names, position
        embeddings of another grid and patch embeddings of another size are resampled), all of it; a
        classifier (``head.*``) is ignored."""
        from timm.models.vision_transformer import checkpoint_filter_fn
        from .network import load_weights
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        theirs = state.get("patch_embed.proj.weight")
        if theirs is not None and theirs.ndim == 4 and theirs.shape[-1] != self.patch:
            warnings.warn(f"{what}: its {theirs.shape[-1]}-pixel patch embedding is resampled to {self.arch}'s "
                          f"{self.patch} pixels (FlexiViT's resampling): a different model than the file's")
        try:
            state = checkpoint_filter_fn(state, self.net)
        except (RuntimeError, ValueError, KeyError) as err:
            raise ValueError(f"{what} does not fit {self.arch}: {str(err).splitlines()[0]}") from None
        load_weights(self.net, state, what, optional=("head.",))


def nearest_sizes(size: int, multiple: int) -> str:
    """The valid sizes on each side of ``size`` (``224 or 240``)."""
    low = size // multiple * multiple
    return " or ".join(str(s) for s in (low, low + multiple) if s > 0)


def _resample(grid: torch.Tensor, size: tuple[int, int], patch: int, stride: int) -> torch.Tensor:
    """The token grid (stride ``patch``) at a level's stride, cut to ``size`` (a padded view's padding goes):
    itself where the strides agree, average pooling where the level's stride is a multiple of the patch, else
    bilinear resampling by exactly ``patch / stride`` (pixel centres kept in place; antialiased going down), so
    cell ``i`` of every level covers pixels ``[i * stride, (i + 1) * stride)``."""
    if stride == patch:
        out = grid
    elif stride % patch == 0 and min(grid.shape[-2:]) >= stride // patch:
        out = F.avg_pool2d(grid, stride // patch)
    elif min(grid.shape[-2:]) * patch >= stride:
        out = F.interpolate(grid, scale_factor=patch / stride, mode="bilinear", align_corners=False,
                            antialias=stride > patch)
    else:  # a view smaller than one cell of this level: its one cell
        out = F.adaptive_avg_pool2d(grid, size)
    return out[..., :size[0], :size[1]]
