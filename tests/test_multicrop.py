"""Multi-crop views (``pipeline.multicrop``): the spec, the sampler, the reference backend's batch, and what
``pipeline.derived`` computes from the affines, each against an independent reference."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from densessl.pipeline import PairRule, PairSpec, ViewGroup, ViewSpec, build_loader, check_batch
from densessl.pipeline.correspondence import count_shared, flow
from densessl.pipeline.derived import coordinate_map, grid_flow, intersection_boxes, view_boxes
from densessl.pipeline.contract import pack_views
from densessl.pipeline.geometry import crop_affines, view_params
from pair_rows import pair_row as draw
from ramp import assert_ramp_agrees, ramp_source_coords

REPO = Path(__file__).resolve().parents[1]
SPEC = ViewSpec.multicrop("2x64,4x32", min_cells=16, num_matches=8)


def test_same_window_gives_view_2_view_1s_window_and_changes_nothing_else():
    """views.same_window (VADeR's Table 3 "same view"): view 2 takes view 1's window with its own flip; view 1,
    both flips and the matches' seed are the ordinary sampler's first draw."""
    spec, same = PairSpec(size=64, num_matches=8, min_matches=8), PairSpec(size=64, num_matches=8, min_matches=8,
                                                                          same_window=True)
    flips_differ = 0
    for seed in range(200):
        p, q = draw(spec, seed, 300, 400), draw(same, seed, 300, 400)
        assert q[5:9].tolist() == q[0:4].tolist() and q[10] == 0
        if p[10] == 1:  # the ordinary pair held at its first draw: the same stream was consumed
            assert q[[0, 1, 2, 3, 4, 9, 11]].tolist() == p[[0, 1, 2, 3, 4, 9, 11]].tolist()
        flips_differ += int(q[4] != q[9])
    assert 60 < flips_differ < 140


@pytest.mark.parametrize("bad,message", [
    (lambda: ViewGroup("global", 0, 224), "count=0"),
    (lambda: ViewGroup("g", 2, 224, scale=(0.5, 0.2)), "scale="),
    (lambda: PairRule(("a", "b"), min_cells=4, num_matches=8), "raise min_cells"),
    (lambda: ViewSpec((ViewGroup("g", 2, 98),)), "not a multiple of the feature stride"),
    (lambda: ViewSpec((ViewGroup("g", 2, 64),), (PairRule(("g", "x")),)), "no group named x"),
    (lambda: ViewSpec((ViewGroup("g", 2, 32),), (PairRule(("g", "g"), 65),)), "exceeds the 64 cells"),
    (lambda: ViewSpec((ViewGroup("g", 1, 32),), (PairRule(("g", "g")),)), "no pair within it"),
    (lambda: ViewSpec.multicrop("2x224;6x96"), "expected NxSIZE"),
    (lambda: ViewGroup("crop1", 2, 64), "not ending in a digit"),
    (lambda: ViewSpec((ViewGroup("g", 2, 64, scale=(0.05, 0.1)),), (PairRule(("g", "g"), min_area=0.2),)),
     "min_area=0.2 exceeds the largest window"),
    (lambda: ViewSpec((ViewGroup("a", 2, 64), ViewGroup("b", 2, 32)), (PairRule(("a", "b")), PairRule(("b", "a")))),
     "two rules for the same groups"),
])
def test_a_view_spec_says_what_is_wrong(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()


def _affines(windows, spec):
    sizes = [spec.group(g).size for g, _ in spec.views()]
    return [crop_affine_row(w, s) for w, s in zip(windows, sizes)], sizes


def crop_affine_row(w, size):
    return crop_affines(w[0], w[1], w[2], w[3], w[4], size)[0]


@settings(max_examples=200)
@given(st.integers(0, 2**62), st.integers(40, 700), st.integers(40, 700))
def test_every_rule_holds_or_the_fallback_is_counted(seed, h, w):
    windows, _ = view_params(seed, h, w, SPEC)
    affines, sizes = _affines(windows, SPEC)
    for i, j, rule in SPEC.pairs():
        later = max(i, j)
        if windows[later, 5] == 0:  # fell back: shares the window of its group's fallback view
            continue
        gi, gj = (np.array(sizes[v]) // SPEC.stride for v in (i, j))
        assert count_shared(affines[i], affines[j], gi[0], gi[1], gj[0], gj[1], 4.0) >= rule.min_cells
        dy = min(windows[i, 0] + windows[i, 2], windows[j, 0] + windows[j, 2]) - max(windows[i, 0], windows[j, 0])
        dx = min(windows[i, 1] + windows[i, 3], windows[j, 1] + windows[j, 3]) - max(windows[i, 1], windows[j, 1])
        assert max(dx, 0) * max(dy, 0) >= rule.min_area * h * w


BACKENDS = ["torch", "ffcv", "dali"]
_BETONS: dict = {}


def data_for(backend, root, tmp_path_factory):
    """What ``build_loader`` reads for ``backend``: the folder, or (FFCV) a raw .beton of it (the stored pixels
    are the decoded JPEG's, so the ramp oracle holds as it is)."""
    if backend != "ffcv":
        return root
    if root not in _BETONS:
        from densessl.pipeline.ffcv import write_beton
        _BETONS[root] = write_beton(root, tmp_path_factory.mktemp("beton") / "views.beton", write_mode="raw")
    return _BETONS[root]


# hard rules and few draws, in both group orders: many views fall back
STRICT = [ViewSpec((ViewGroup("glob", 2, 64, scale=(0.05, 0.15)), ViewGroup("loc", 3, 32, scale=(0.02, 0.05))),
                   (PairRule(("glob", "glob"), 200, 0.0, 8), PairRule(("loc", "glob"), 60, 0.0, 8)), max_tries=2),
          ViewSpec((ViewGroup("loc", 3, 32, scale=(0.02, 0.05)), ViewGroup("glob", 2, 64, scale=(0.05, 0.15))),
                   (PairRule(("loc", "glob"), 60, 0.0, 8), PairRule(("glob", "glob"), 200, 0.0, 8)), max_tries=2)]


@pytest.mark.parametrize("spec", STRICT, ids=["globals first", "locals first"])
def test_a_fallen_back_view_lies_inside_its_partners_and_its_pairs_still_match(spec):
    """A view that never met its rules lies inside the partners it is matched from and around the partners matched
    into it (every counted cell is then shared), so its matches can always be drawn."""
    fell_back = 0
    for seed in range(300):
        windows, seeds = view_params(seed, 180, 240, spec)
        pack_views(np.zeros((1, spec.offsets[-1]), np.uint8), windows[None], seeds[None], [[180, 240]], [0], spec,
                   False)  # raises if a pair cannot give its matches
        for i, j, _ in spec.pairs():  # the rule counts view i's cells inside view j
            for v, o in ((i, j), (j, i)):
                if windows[v, 5] == 0 and o < v:  # v fell back after its partner o was drawn
                    fell_back += 1
                    inner, outer = (windows[i], windows[j])
                    assert outer[0] <= inner[0] and inner[0] + inner[2] <= outer[0] + outer[2]
                    assert outer[1] <= inner[1] and inner[1] + inner[3] <= outer[1] + outer[3]
    assert fell_back > 50


def loader(root, backend="torch", spec=SPEC, **kw):
    return build_loader(backend, root, spec, **{"batch_size": 4, "workers": 0 if backend == "torch" else 1,
                                                "seed": 3, **kw})


# more groups than DALI's numba operator has outputs: DALI cuts them with its own ROI resize, as on the GPU
MANY_GROUPS = ViewSpec(tuple(ViewGroup(name, 1, 64, scale=(0.1, 0.5)) for name in "abcdefg"),
                       tuple(PairRule((name, "a"), 8, 0.0, 4) for name in "bcdefg"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_view_and_every_match_agree_with_the_ramp(ramp_root, backend, tmp_path_factory):
    """Each view of each group, at its own size, shows the source points its affine predicts; each match shows
    the same source point in both of its views."""
    agrees_with_the_ramp(loader(data_for(backend, ramp_root, tmp_path_factory), backend), SPEC)


def test_dali_with_more_groups_than_its_numba_outputs_agrees_with_the_ramp(ramp_root):
    agrees_with_the_ramp(loader(ramp_root, "dali", MANY_GROUPS), MANY_GROUPS)


def agrees_with_the_ramp(batches, spec):
    geometry_err, pair_err, seen_views = [], [], 0
    for batch in batches:
        check_batch(batch, spec)
        for b in range(batch["index"].shape[0]):
            src_hw = batch["source_hw"][b].tolist()
            views = {f"{g.name}{k}": (batch[f"views/{g.name}"][b, k].cpu(), batch[f"affines/{g.name}"][b, k].double(),
                                      g.size) for g in spec.groups for k in range(g.count)}
            for view, affine, size in views.values():
                pts = np.random.default_rng(b).uniform(2, min(size) - 2, (16, 2))
                seen = ramp_source_coords(view, pts, src_hw)
                predicted = np.asarray(torch.linalg.solve(affine[:, :2], torch.from_numpy(pts).T - affine[:, 2:]).T)
                geometry_err.append(seen - predicted)
                seen_views += 1
            for key in [k.removeprefix("matches/") for k in batch if k.startswith("matches/")]:
                (vi, ai, si), (vj, aj, sj) = (views[name] for name in key.split("-"))
                m, xy = batch[f"matches/{key}"][b].numpy(), batch[f"match_xy/{key}"][b].double().numpy()
                gw = si[1] // spec.stride
                p_i = (np.stack([m[:, 0] % gw, m[:, 0] // gw], -1) + 0.5) * spec.stride
                pair_err.append(ramp_source_coords(vi, p_i, src_hw) - ramp_source_coords(vj, xy * spec.stride, src_hw))
    assert seen_views >= 16 * 6 and pair_err
    assert_ramp_agrees(np.concatenate(geometry_err))
    assert_ramp_agrees(np.concatenate(pair_err))


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_serves_same_window_pairs(synthetic_root, backend, tmp_path_factory):
    spec = PairSpec(size=64, num_matches=8, min_matches=8, same_window=True)
    batch = next(iter(build_loader(backend, data_for(backend, synthetic_root / "train", tmp_path_factory), spec,
                                   batch_size=4, workers=1, seed=3)))
    g1, g2 = batch["geometry1"].double(), batch["geometry2"].double()
    flipped = torch.sign(g1[:, 0, 0]) != torch.sign(g2[:, 0, 0])
    torch.testing.assert_close(g1[:, 0, 0].abs(), g2[:, 0, 0].abs())  # the same window, each with its own flip
    torch.testing.assert_close(g1[:, 1], g2[:, 1])
    torch.testing.assert_close(g1[~flipped, 0], g2[~flipped, 0])
    assert (batch["tries"] == 0).all()


def _digest(batches):
    return [{k: v.cpu().clone() for k, v in b.items()} for b in batches]


def _same(a, b):
    assert len(a) == len(b) and len(a) >= 2
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_views_whatever_the_workers_and_exact_resume(synthetic_root, backend, tmp_path_factory):
    root = data_for(backend, synthetic_root / "train", tmp_path_factory)
    full = _digest(loader(root, backend, workers=1))
    _same(full, _digest(loader(root, backend, workers=2)))
    first = loader(root, backend, workers=1)
    it = iter(first)
    next(it)
    state = first.state_dict()
    resumed = loader(root, backend, workers=2, state=state)
    resumed.set_epoch(state["epoch"], state["batch"])
    _same(full[1:], _digest(resumed))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_files_are_skipped_and_listed(tmp_path, backend, tmp_path_factory):
    from corpus import BAD, write_corpus
    corpus = write_corpus(tmp_path / "corpus")
    log = tmp_path / "skipped.txt"
    if backend == "ffcv":  # the writer replaces them and lists them beside the .beton
        from densessl.pipeline.ffcv import write_beton
        data = write_beton(corpus, tmp_path / "corpus.beton")
        log = data.with_name(data.name + ".skipped.txt")
        batches = list(loader(data, backend))
    else:
        batches = list(loader(corpus, backend, skip_log=str(log)))
    assert batches and all(b["index"].shape == (4,) for b in batches)
    for b in batches:
        check_batch(b, SPEC)
    listed = {Path(line.split("\t")[0]).name for line in log.read_text().splitlines()}
    assert listed and listed <= set(BAD)


windows_st = st.tuples(st.integers(0, 200), st.integers(0, 200), st.integers(8, 300), st.integers(8, 300),
                       st.booleans())
sizes_st = st.sampled_from([(32, 32), (64, 64), (96, 64), (224, 224)])


@settings(max_examples=200)
@given(windows_st, sizes_st, windows_st, sizes_st)
def test_boxes_intersections_maps_and_flow_agree(w1, size1, w2, size2):
    from geometry_reference import apply_affine
    a1 = torch.from_numpy(crop_affines(*[np.array([v]) for v in w1], size1)).double()
    a2 = torch.from_numpy(crop_affines(*[np.array([v]) for v in w2], size2)).double()
    # a view's box is its window, flipped or not
    box = view_boxes(a1, size1)[0].tolist()
    assert box == pytest.approx([w1[1], w1[0], w1[1] + w1[3], w1[0] + w1[2]], abs=1e-9)
    # the intersection boxes map back to the windows' intersection, in both views
    in1, in2, overlaps = intersection_boxes(a1, size1, a2, size2)
    top, left = max(w1[0], w2[0]), max(w1[1], w2[1])
    bottom, right = min(w1[0] + w1[2], w2[0] + w2[2]), min(w1[1] + w1[3], w2[1] + w2[3])
    assert bool(overlaps[0]) == (bottom > top and right > left)
    if overlaps[0]:
        for a, b in ((a1, in1), (a2, in2)):
            corners = torch.tensor([[b[0, 0], b[0, 1]], [b[0, 2], b[0, 3]]], dtype=torch.float64)
            back = view_boxes_points(a[0], corners)
            assert back == pytest.approx([left, top, right, bottom], abs=1e-6)
    # the coordinate map at view resolution is the inverse affine at pixel centres
    cmap = coordinate_map(a1, size1)[0]
    ys, xs = np.mgrid[0:size1[0], 0:size1[1]] + 0.5
    inv = np.linalg.inv(np.vstack([a1[0].numpy(), [0, 0, 1]]))[:2]
    want = apply_affine(inv, np.stack([xs, ys], -1).reshape(-1, 2)).reshape(size1[0], size1[1], 2)
    np.testing.assert_allclose(cmap.permute(1, 2, 0).numpy(), want, atol=1e-6)
    # the grid flow is the Numba kernel's, away from view 2's border (the kernel decides ties exactly)
    ours = grid_flow(a1, size1, a2, size2)[0].numpy()
    kernel = flow(a1.numpy(), a2.numpy(), size1, 4, parallel=False, view_hw2=size2)[0]
    gh2, gw2 = size2[0] // 4, size2[1] // 4
    both = np.where(np.isnan(kernel), ours, kernel)  # a point either one places near view 2's border
    near = (np.abs(both[..., 0]) < 1e-6) | (np.abs(both[..., 0] - gw2) < 1e-6) | (np.abs(both[..., 1]) < 1e-6) | \
        (np.abs(both[..., 1] - gh2) < 1e-6)
    np.testing.assert_allclose(ours[~near], kernel[~near], atol=1e-5)  # NaN where both say outside


def view_boxes_points(affine, corners):
    """Source box of two view-pixel corners."""
    inv = torch.linalg.inv(torch.cat([affine, affine.new_tensor([[0, 0, 1]])]))[:2]
    pts = corners @ inv[:, :2].T + inv[:, 2]
    return [float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max())]


def test_the_leopart_style_example_runs(synthetic_root):
    sys.path.insert(0, str(REPO / "examples"))
    try:
        from leopart_style import main
    finally:
        sys.path.pop(0)
    losses = main(["--data", str(synthetic_root / "train"), "--views", "2x64,2x32", "--batch", "4", "--steps", "2",
                   "--workers", "0"])
    assert len(losses) == 2 and all(np.isfinite(losses))
