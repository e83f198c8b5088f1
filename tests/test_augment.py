import pytest
import torch
from torchvision.transforms.v2 import functional as F

from densessl.pipeline.augment import (IMAGENET_MEAN, IMAGENET_STD, PhotometricAugment, adjust_brightness, adjust_contrast,
                              adjust_hue, adjust_saturation, gaussian_blur)


@pytest.mark.parametrize("op,reference,factors", [
    (adjust_brightness, F.adjust_brightness, [0.6, 1.0, 1.4]),
    (adjust_contrast, F.adjust_contrast, [0.6, 1.0, 1.4]),
    (adjust_saturation, F.adjust_saturation, [0.6, 1.0, 1.4]),
    (adjust_hue, F.adjust_hue, [-0.1, 0.0, 0.07]),
])
def test_per_sample_ops_match_torchvision(op, reference, factors):
    x = torch.rand(3, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    got = op(x.clone(), torch.tensor(factors))
    want = torch.stack([reference(x[i], f) for i, f in enumerate(factors)])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_blur_matches_torchvision_and_identity_at_zero():
    x = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    got = gaussian_blur(x, torch.tensor([1.5, 0.0]), 9)
    torch.testing.assert_close(got[0], F.gaussian_blur(x[0], [9, 9], [1.5, 1.5]), atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], x[1])


def test_disabled_augment_only_normalises():
    aug = PhotometricAugment(jitter_p=0, grayscale_p=0, blur_p=0)
    v = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(aug(v), (v.float() / 255 - mean) / std)


def test_grayscale_and_per_sample_randomness():
    v = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8).repeat(8, 1, 1, 1)
    gray = PhotometricAugment(jitter_p=0, grayscale_p=1, blur_p=0, mean=(0, 0, 0), std=(1, 1, 1))(v)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    out = PhotometricAugment()(v, generator=torch.Generator().manual_seed(0))
    assert len({tuple(o.flatten()[:16].tolist()) for o in out}) > 4, "each sample needs its own parameters"
    again = PhotometricAugment()(v, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, again)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        PhotometricAugment()(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="probability"):
        PhotometricAugment(blur_p=2)


@pytest.mark.gpu
def test_runs_on_cuda():
    v = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, device="cuda")
    out = PhotometricAugment(solarize_p=0.2)(v, generator=torch.Generator("cuda").manual_seed(0))
    assert out.device.type == "cuda" and torch.isfinite(out).all()
