import pytest
import torch
import torchvision

from densessl.model.builder import MoCo, ModelConfig
from densessl.model.checkpoint import load_encoder_weights
from densessl.model.methods import method_class, method_config
from densessl.model.network import BilinearUp2, DenseNetwork, ResNetEncoder
from released import released_checkpoints


def network(arch: str, method: str) -> DenseNetwork:
    """The query network a method builds on ``arch``."""
    encoder = ResNetEncoder(arch)
    return DenseNetwork(encoder, method_class(method)(method_config(method)).heads(encoder.channels, 128))


def test_vader_network_shapes_and_decoder_size():
    net = network("resnet18", "vader").eval()
    out = net(torch.randn(2, 3, 64, 96))
    assert out["dense"].shape == (2, 128, 16, 24)
    decoder50 = network("resnet50", "vader").decoder
    assert 1.5e6 < sum(p.numel() for p in decoder50.parameters()) < 3e6  # "about 2M"


def test_heads_per_method():
    x = torch.randn(2, 3, 64, 64)
    dense = network("resnet18", "densecl").eval()(x)
    assert dense["global"].shape == (2, 128) and dense["dense"].shape == (2, 128, 2, 2)
    assert set(network("resnet18", "mocov2").eval()(x)) == {"c5", "global"}


def test_loads_encoders_from_every_released_format(tmp_path):
    source, other = torchvision.models.resnet18(weights=None), torchvision.models.resnet18(weights=None)
    for name in released_checkpoints(source, other, tmp_path):
        net = network("resnet18", "vader")
        load_encoder_weights(net.encoder, tmp_path / name)
        for got, want in zip(net.encoder.net.state_dict().values(), source.state_dict().values()):
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "r50.pth")
    with pytest.raises(ValueError, match="does not fit"):
        load_encoder_weights(ResNetEncoder("resnet18"), tmp_path / "r50.pth")


def test_queue_pointer_wraps_and_rejects_bad_sizes():
    m = MoCo(ModelConfig(arch="resnet18", dim=8), method_config(queue_size=12))
    for step in range(4):
        keys = torch.full((4, 8), float(step))
        m.enqueue("queue_dense", keys)
    assert int(m.queue_dense_ptr) == 4 and (m.queue_dense[:, :4] == 3).all() and (m.queue_dense[:, 4:8] == 1).all()
    with pytest.raises(ValueError, match="not a multiple"):
        m.enqueue("queue_dense", torch.zeros(5, 8))


def test_momentum_update():
    m = MoCo(ModelConfig(arch="resnet18"), method_config(queue_size=64, momentum=0.9))
    with torch.no_grad():
        for p in m.encoder_q.parameters():
            p.add_(1.0)
    before = [p.clone() for p in m.encoder_k.parameters()]
    m.momentum_update()
    for k, b, q in zip(m.encoder_k.parameters(), before, m.encoder_q.parameters()):
        assert torch.equal(k, b.mul(0.9).add(q, alpha=1 - 0.9))  # bit for bit the per-tensor update


def test_shuffle_bn_unshuffles_keys():
    m = MoCo(ModelConfig(arch="resnet18"), method_config(queue_size=64)).eval()
    # with fixed BN statistics, shuffling then unshuffling must give exactly the plain forward
    x = torch.randn(6, 3, 64, 64)
    torch.testing.assert_close(m.encode_keys(x)["dense"], m.encoder_k(x)["dense"])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_decoder_upsampling_is_bilinear_2x_in_any_layout(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    x = torch.randn(3, 16, 7, 5, device=device)
    reference = torch.nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)(x)
    for layout in (torch.contiguous_format, torch.channels_last):
        out = BilinearUp2()(x.contiguous(memory_format=layout))
        assert out.shape == (3, 16, 14, 10)
        torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["vader", "densecl", "mocov2"])
def test_methods_train_step(method):
    torch.manual_seed(0)
    extra = {"symmetric": True} if method == "vader" else {}
    m = MoCo(ModelConfig(arch="resnet18"), method_config(method, queue_size=64 * 4, **extra))
    v1, v2 = torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64)
    matches = torch.randint(0, 256, (4, 8, 2))
    xy = torch.rand(4, 8, 2) * 16
    loss, _ = m({"pair0": v1, "pair1": v2}, {("pair0", "pair1"): (matches, xy)})
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in m.encoder_q.parameters()]
    assert all(g is not None for g in grads) and all(p.grad is None for p in m.encoder_k.parameters())
