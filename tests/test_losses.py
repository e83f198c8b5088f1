"""Each loss against a slow, obviously-correct float64 reference written with explicit loops."""

import math

import pytest
import torch
from torch.nn import functional as F

from densessl.model.losses import gather_cells, info_nce, sample_bilinear
from densessl.model.methods.densecl import densecl_dense_loss
from densessl.model.methods.vader import vader_loss

T = 0.07


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def ref_info_nce(q, k, queue, t):
    total = 0.0
    for i in range(len(q)):
        logits = [float(q[i] @ k[i]) / t] + [float(q[i] @ queue[:, j]) / t for j in range(queue.shape[1])]
        top = max(logits)
        total += -(logits[0] - top - math.log(sum(math.exp(v - top) for v in logits)))
    return total / len(q)


def ref_bilinear(emb, x, y):
    """Value of a [C,H,W] map at continuous (x, y) with pixel centres at +0.5, clamped at the border."""
    _, h, w = emb.shape
    px, py = min(max(x - 0.5, 0.0), w - 1.0), min(max(y - 0.5, 0.0), h - 1.0)
    x0, y0 = int(math.floor(px)), int(math.floor(py))
    x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
    fx, fy = px - x0, py - y0
    return ((1 - fx) * (1 - fy) * emb[:, y0, x0] + fx * (1 - fy) * emb[:, y0, x1]
            + (1 - fx) * fy * emb[:, y1, x0] + fx * fy * emb[:, y1, x1])


def unit(v):
    return v / v.norm()


def random_case(seed, b=3, k=5, c=8, h=6, w=7, q=11):
    g = torch.Generator().manual_seed(seed)
    q_emb, k_emb = torch.randn(b, c, h, w, generator=g), torch.randn(b, c, h, w, generator=g)
    cells = torch.stack([torch.randperm(h * w, generator=g)[:k] for _ in range(b)])
    xy = torch.rand(b, k, 2, generator=g) * torch.tensor([w, h])
    matches = torch.stack([cells, (xy[..., 1].floor() * w + xy[..., 0].floor()).long()], -1)
    queue = F.normalize(torch.randn(c, q, generator=g), dim=0)
    return q_emb, k_emb, matches, xy, queue


@pytest.mark.parametrize("seed", range(3))
def test_info_nce(seed):
    g = torch.Generator().manual_seed(seed)
    q, k = F.normalize(torch.randn(6, 8, generator=g), dim=1), F.normalize(torch.randn(6, 8, generator=g), dim=1)
    queue = F.normalize(torch.randn(8, 13, generator=g), dim=0)
    assert float(info_nce(q, k, queue, 0.2)) == pytest.approx(ref_info_nce(q, k, queue, 0.2), rel=1e-10)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("reverse", [False, True])
def test_vader_loss(seed, reverse):
    q_emb, k_emb, matches, xy, queue = random_case(seed)
    got, keys = vader_loss(q_emb, k_emb, matches, xy, queue, T, 10.0, reverse=reverse)
    w = q_emb.shape[-1]
    qs, ks = [], []
    for b in range(q_emb.shape[0]):
        for j in range(matches.shape[1]):
            cell = int(matches[b, j, 0])
            x, y = float(xy[b, j, 0]), float(xy[b, j, 1])
            if not reverse:  # query at view-1 cell, key at the exact view-2 point
                qs.append(unit(q_emb[b, :, cell // w, cell % w]))
                ks.append(unit(ref_bilinear(k_emb[b], x, y)))
            else:
                qs.append(unit(ref_bilinear(q_emb[b], x, y)))
                ks.append(unit(k_emb[b, :, cell // w, cell % w]))
    qs, ks = torch.stack(qs), torch.stack(ks)
    assert float(got) == pytest.approx(10.0 * ref_info_nce(qs, ks, queue, T), rel=1e-10)
    torch.testing.assert_close(keys, ks)


def test_bilinear_at_cell_centres_equals_gather():
    q_emb, _, matches, _, _ = random_case(7)
    w = q_emb.shape[-1]
    cells = matches[..., 0]
    centres = torch.stack([cells % w, cells // w], -1).double() + 0.5
    torch.testing.assert_close(sample_bilinear(q_emb, centres), gather_cells(q_emb, cells))


@pytest.mark.parametrize("seed", range(3))
def test_densecl_dense_loss(seed):
    g = torch.Generator().manual_seed(seed)
    b, d, c, s, nq = 2, 6, 10, 9, 7
    qd, kd = torch.randn(b, d, s, generator=g), torch.randn(b, d, s, generator=g)
    qf, kf = torch.randn(b, c, s, generator=g), torch.randn(b, c, s, generator=g)
    queue = F.normalize(torch.randn(d, nq, generator=g), dim=0)
    qs, ks = [], []
    for i in range(b):
        for loc in range(s):
            sims = [float(unit(qf[i, :, loc]) @ unit(kf[i, :, other])) for other in range(s)]
            best = max(range(s), key=lambda o: sims[o])
            qs.append(unit(qd[i, :, loc]))
            ks.append(unit(kd[i, :, best]))
    want = ref_info_nce(torch.stack(qs), torch.stack(ks), queue, 0.2)
    assert float(densecl_dense_loss(qd, kd, qf, kf, queue, 0.2)) == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("reverse", [False, True])
def test_vader_loss_with_negatives_from_the_same_image(seed, reverse):
    """negatives='image': each query's negatives are the key map's cells of its own image farther than the
    exclusion radius from the positive's position; written out one query at a time."""
    q_emb, k_emb, matches, xy, queue = random_case(seed)
    radius = 1.5
    got, _ = vader_loss(q_emb, k_emb, matches, xy, queue, T, 10.0, reverse=reverse, exclusion_radius=radius)
    h, w = k_emb.shape[-2:]
    terms = []
    for b in range(q_emb.shape[0]):
        key_map = k_emb[b]  # the key map is the other view's, in either direction
        for j in range(matches.shape[1]):
            cell = int(matches[b, j, 0])
            x, y = float(xy[b, j, 0]), float(xy[b, j, 1])
            if not reverse:
                q, k, px, py = unit(q_emb[b, :, cell // w, cell % w]), unit(ref_bilinear(k_emb[b], x, y)), x, y
            else:
                q, k = unit(ref_bilinear(q_emb[b], x, y)), unit(k_emb[b, :, cell // w, cell % w])
                px, py = cell % w + 0.5, cell // w + 0.5
            logits = [float(q @ k) / T]
            for cy in range(h):
                for cx in range(w):
                    if (cx + 0.5 - px) ** 2 + (cy + 0.5 - py) ** 2 > radius ** 2:
                        logits.append(float(q @ unit(key_map[:, cy, cx])) / T)
            logits = torch.tensor(logits, dtype=torch.float64)
            terms.append(float(torch.logsumexp(logits, 0) - logits[0]))
    assert float(got) == pytest.approx(10.0 * sum(terms) / len(terms), rel=1e-8)


def _vader(**kw):
    from densessl.model.methods.vader import Vader, VaderConfig
    return Vader(VaderConfig(queue_size=13 * 4, **kw))


def test_in_batch_negatives_read_no_queue_fill_none_and_match_the_reference():
    """negatives='batch' (SimCLR-style): each query's negatives are the step's other positive keys."""
    q_emb, k_emb, matches, xy, queue = random_case(3)
    method = _vader(negatives="batch")
    losses = []
    for q in (queue, torch.zeros_like(queue)):  # the queue's contents do not matter
        loss, _, enqueued = method.loss({"pair0": {"dense": q_emb}}, {"pair1": {"dense": k_emb}}, {"queue_dense": q},
                                        {("pair0", "pair1"): (matches, xy)}, 0)
        losses.append(float(loss))
        assert enqueued == {}
    _, keys = vader_loss(q_emb, k_emb, matches, xy, queue, T, 10.0)
    w = q_emb.shape[-1]
    qs = torch.stack([unit(q_emb[b, :, int(c) // w, int(c) % w]) for b in range(q_emb.shape[0])
                      for c in matches[b, :, 0]])
    ref = 0.0
    for i in range(len(qs)):  # row i: positive keys[i], negatives every other key
        logits = [float(qs[i] @ keys[j]) / T for j in range(len(keys))]
        ref += -logits[i] + math.log(sum(math.exp(v) for v in logits))
    assert losses[0] == losses[1] == pytest.approx(10.0 * ref / len(qs), rel=1e-10)
    assert losses[0] != pytest.approx(float(vader_loss(q_emb, k_emb, matches, xy, queue, T, 10.0)[0]), rel=1e-6)


def test_unmatched_positives_move_the_queries_and_nothing_else():
    """positives='unmatched' (Table 3): queries at random cells of view 1; the keys, and so the queue, are the
    matched run's."""
    q_emb, k_emb, matches, xy, queue = random_case(4)
    batch = ({"pair0": {"dense": q_emb}}, {"pair1": {"dense": k_emb}}, {"queue_dense": queue},
             {("pair0", "pair1"): (matches, xy)}, 0)
    matched_loss, _, matched_keys = _vader().loss(*batch)
    torch.manual_seed(11)
    loss, _, keys = _vader(positives="unmatched").loss(*batch)
    torch.manual_seed(11)
    cells = torch.randint(0, q_emb.shape[-2] * q_emb.shape[-1], matches.shape[:-1])
    shuffled = torch.cat([cells[..., None], matches[..., 1:]], -1)
    torch.testing.assert_close(keys["queue_dense"], matched_keys["queue_dense"])
    assert float(loss) == pytest.approx(float(vader_loss(q_emb, k_emb, shuffled, xy, queue, T, 10.0)[0]), rel=1e-10)
    assert float(loss) != pytest.approx(float(matched_loss), rel=1e-6)


def test_mocov2_on_multicrop_views_averages_one_global_infonce_per_matched_pair():
    """R3's control: MoCo v2 fed VADeR's crops; each matched pair (i, j) is view i's query against view j's key."""
    from densessl.model.methods.mocov2 import MoCoV2, MoCoV2Config, global_loss
    from densessl.pipeline.views import MultiCropViews
    g = torch.Generator().manual_seed(5)
    method = MoCoV2(MoCoV2Config(queue_size=90))
    spec = MultiCropViews("2x64,4x32").view_spec
    assert method.keys_per_sample(spec) == 9  # global0-global1 and each of 4 locals with each of 2 globals
    names = ["global0", "global1", "local0", "local1", "local2", "local3"]
    queries = {n: {"global": torch.randn(3, 8, generator=g)} for n in names}
    keys = {n: {"global": torch.randn(3, 8, generator=g)} for n in ("global0", "global1")}
    queue = F.normalize(torch.randn(8, 90, generator=g), dim=0)
    pairs = {("global0", "global1"): None, ("local0", "global0"): None, ("local3", "global1"): None}
    loss, _, new = method.loss(queries, keys, {"queue_global": queue}, pairs, 0)
    ref = [global_loss(queries[i], keys[j], queue, 0.2) for i, j in pairs]
    assert float(loss) == pytest.approx(sum(float(r[0]) for r in ref) / 3, rel=1e-12)
    torch.testing.assert_close(new["queue_global"], torch.cat([r[1] for r in ref]))
