"""Photometric augmentation, batched in torch on the training device.

Loaders only decode and cut geometry: on the CPU, colour jitter and blur would cost a loader several times its
own work, while on the GPU they are a rounding error next to the model. Every random parameter is drawn
per sample, so one call on a batch equals the per-image torchvision recipe (MoCo v2: jitter 0.4/0.4/0.4/0.1
with p=0.8 in a random order per image, grayscale p=0.2, Gaussian blur sigma in [0.1, 2] with p=0.5).
Photometric changes never move pixels, so the loader's geometry and matches stay valid.
"""

from __future__ import annotations

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as torchvision's rgb_to_grayscale


def normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Float images in [0, 1] with channels at dim -3 -> normalised as the networks see them in training."""
    return (x - torch.as_tensor(mean).to(x).view(3, 1, 1)) / torch.as_tensor(std).to(x).view(3, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    w = x.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def adjust_brightness(x, factor):
    return _blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x, factor):
    return _blend(x, grayscale(x).mean((1, 2, 3), keepdim=True), factor)


def adjust_saturation(x, factor):
    return _blend(x, grayscale(x), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` (fraction of a turn, per sample) through HSV, as torchvision does."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, h / 6.0, torch.zeros_like(h))
    h = torch.remainder(h + shift.view(-1, 1, 1), 1.0)
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    v = maxc
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    # sector table of (r, g, b) sources: 0 -> v, 1 -> t, 2 -> p, 3 -> q
    choices = torch.stack([v, t, p, q], 1)
    table = torch.tensor([[0, 1, 2], [3, 0, 2], [2, 0, 1], [2, 3, 0], [1, 2, 0], [0, 2, 3]], device=x.device)
    idx = table[i].permute(0, 3, 1, 2)  # [B,3,H,W] indices into choices
    return torch.gather(choices, 1, idx).clamp_(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable blur with one sigma per sample (sigma <= 0 leaves that sample unchanged)."""
    bsz, ch, h, w = x.shape
    radius = kernel_size // 2
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(x.dtype).clamp(min=1e-6).view(-1, 1)
    k = torch.exp(-0.5 * (t / s) ** 2)
    delta = (t == 0).to(x.dtype).expand_as(k)
    k = torch.where(sigma.view(-1, 1) > 0, k / k.sum(1, keepdim=True), delta)
    k = k.repeat_interleave(ch, 0)  # one kernel per (sample, channel)
    y = x.reshape(1, bsz * ch, h, w)
    y = nn.functional.pad(y, (radius, radius, radius, radius), mode="reflect")
    y = nn.functional.conv2d(y, k.view(-1, 1, kernel_size, 1), groups=bsz * ch)
    y = nn.functional.conv2d(y, k.view(-1, 1, 1, kernel_size), groups=bsz * ch)
    return y.view(bsz, ch, h, w)


class PhotometricAugment(nn.Module):
    """uint8 ``[B,3,H,W]`` views -> augmented, normalised float views, on whatever device they live on."""

    def __init__(self, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, jitter_p=0.8, grayscale_p=0.2,
                 blur_p=0.5, blur_sigma=(0.1, 2.0), solarize_p=0.0, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        if not 0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue}")
        for name, p in (("jitter_p", jitter_p), ("grayscale_p", grayscale_p), ("blur_p", blur_p),
                        ("solarize_p", solarize_p)):
            if not 0 <= p <= 1:
                raise ValueError(f"{name} must be a probability, got {p}")
        self.strengths = (brightness, contrast, saturation, hue)
        self.jitter_p, self.grayscale_p, self.blur_p, self.solarize_p = jitter_p, grayscale_p, blur_p, solarize_p
        self.blur_sigma = blur_sigma
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def _uniform(self, n, lo, hi, like, generator):
        return torch.rand(n, device=like.device, generator=generator) * (hi - lo) + lo

    @torch.no_grad()
    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 [B,3,H,W] views, got {tuple(images.shape)} {images.dtype}")
        x = images.float().div_(255)
        n, dev = x.shape[0], x.device

        def coin(p):
            return torch.rand(n, device=dev, generator=generator) < p

        jitter = coin(self.jitter_p)
        b, c, s, h = self.strengths
        factors = [
            self._uniform(n, max(0.0, 1 - b), 1 + b, x, generator),
            self._uniform(n, max(0.0, 1 - c), 1 + c, x, generator),
            self._uniform(n, max(0.0, 1 - s), 1 + s, x, generator),
            self._uniform(n, -h, h, x, generator),
        ]
        identity = (1.0, 1.0, 1.0, 0.0)
        ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
        order = torch.rand(n, 4, device=dev, generator=generator).argsort(1)  # a random order per sample
        for step in range(4):
            for k, op in enumerate(ops):
                if self.strengths[k] == 0:
                    continue
                active = jitter & (order[:, step] == k)
                x = op(x, torch.where(active, factors[k], torch.full_like(factors[k], identity[k])))
        gray = coin(self.grayscale_p).view(-1, 1, 1, 1)
        x = torch.where(gray, grayscale(x).expand_as(x), x)
        if self.blur_p > 0:
            sigma = self._uniform(n, *self.blur_sigma, x, generator)
            sigma = torch.where(coin(self.blur_p), sigma, torch.zeros_like(sigma))
            kernel = 2 * round(0.05 * min(x.shape[-2:])) + 1  # 23 for 224 views, as in BYOL
            x = gaussian_blur(x, sigma, kernel)
        if self.solarize_p > 0:
            x = torch.where(coin(self.solarize_p).view(-1, 1, 1, 1) & (x >= 0.5), 1 - x, x)
        return normalize(x, self.mean, self.std)  # works whichever device the module was left on
