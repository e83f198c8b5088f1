import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from densessl.pipeline.correspondence import count_valid, flow, sample_matches
from densessl.pipeline import PairSpec
from densessl.pipeline.geometry import invert_affine, sample_view_pair
from geometry_reference import apply_affine, compose

VIEW, STRIDE = (64, 96), 4
GH, GW = VIEW[0] // STRIDE, VIEW[1] // STRIDE


def reference_flow(a1, a2):
    """Slow float64 reference: every view-1 cell centre through inv(A1) then A2, in grid units."""
    ys, xs = np.mgrid[0:GH, 0:GW] + 0.5
    pts = np.stack([xs, ys], -1) * STRIDE
    return apply_affine(compose(a2, invert_affine(a1)), pts) / STRIDE


@st.composite
def arbitrary_affine(draw):
    """A view map with rotation, anisotropic scale, shear, translation and optional mirror."""
    ang, sx, sy = draw(st.floats(-math.pi, math.pi)), draw(st.floats(0.3, 3)), draw(st.floats(0.3, 3))
    shear, mirror = draw(st.floats(-0.4, 0.4)), draw(st.sampled_from([1.0, -1.0]))
    c, s = math.cos(ang), math.sin(ang)
    lin = np.array([[c, -s], [s, c]]) @ np.array([[sx * mirror, shear], [0, sy]])
    t = np.array([draw(st.floats(-100, 150)), draw(st.floats(-100, 150))])
    return np.concatenate([lin, t[:, None]], 1)


@st.composite
def view_pairs(draw):
    """Either random crop+flip views of a random image, or two arbitrary affines."""
    if draw(st.booleans()):
        pair = sample_view_pair(draw(st.integers(0, 2**64 - 1)), draw(st.integers(20, 900)),
                                draw(st.integers(20, 900)), PairSpec(size=VIEW, num_matches=8, min_matches=8, stride=STRIDE))
        return pair.affine1, pair.affine2
    return draw(arbitrary_affine()), draw(arbitrary_affine())


@settings(max_examples=200, deadline=None)
@given(view_pairs())
def test_flow_is_nan_exactly_outside_view2(pair):
    a1, a2 = pair
    got = flow(a1, a2, VIEW, STRIDE)[0]
    ref = reference_flow(a1, a2)
    inside = (ref[..., 0] >= 0) & (ref[..., 0] < GW) & (ref[..., 1] >= 0) & (ref[..., 1] < GH)
    # points within rounding distance of view 2's border may fall either way; every other one must agree
    edge = np.minimum(np.abs(ref), np.abs(ref - [GW, GH])).min(-1) < 1e-7
    valid = np.isfinite(got[..., 0])
    assert np.array_equal(valid[~edge], inside[~edge])
    np.testing.assert_allclose(got[valid], ref[valid], atol=1e-3)


@settings(max_examples=200, deadline=None)
@given(view_pairs(), st.integers(0, 2**64 - 1), st.integers(1, 8))
def test_matches_name_the_same_source_point(pair, seed, k):
    a1, a2 = pair
    n = count_valid(a1, a2, GH, GW, float(STRIDE))
    if n < k:
        with pytest.raises(ValueError, match="share only"):
            sample_matches(a1, a2, [seed], k, VIEW, STRIDE)
        return
    matches, xy2, n_valid = sample_matches(a1, a2, [seed], k, VIEW, STRIDE)
    assert n_valid[0] == n
    m, xy2 = matches[0], xy2[0].astype(np.float64)
    assert len(set(m[:, 0].tolist())) == k, "sampled with replacement"
    assert ((m >= 0) & (m < GH * GW)).all()
    centre1 = np.stack([m[:, 0] % GW, m[:, 0] // GW], -1) + 0.5
    centre2 = np.stack([m[:, 1] % GW, m[:, 1] // GW], -1) + 0.5
    src1 = apply_affine(invert_affine(a1), centre1 * STRIDE)
    src2_exact = apply_affine(invert_affine(a2), xy2 * STRIDE)
    src2_cell = apply_affine(invert_affine(a2), centre2 * STRIDE)
    # the fractional position is exact; the matched view-2 cell contains it
    np.testing.assert_allclose(src2_exact, src1, atol=1e-2 * np.abs(invert_affine(a2)).max() + 1e-3)
    assert (np.abs(xy2 - centre2) <= 0.5 + 1e-6).all()
    # and the two cell centres agree within one view-2 feature cell, measured in source pixels
    corners = np.array([[0.5, 0.5], [0.5, -0.5]]) * STRIDE
    cell = np.abs(corners @ invert_affine(a2)[:, :2].T).sum(0)  # half-extent of a cell in source x and y
    assert (np.abs(src2_cell - src1) <= cell + 1e-6).all()


def test_sampling_is_uniform_without_replacement():
    # view 2 is view 1 shifted so that exactly 2x5 grid cells overlap
    a1 = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    a2 = np.array([[1.0, 0, -(GW - 5) * STRIDE], [0, 1.0, -(GH - 2) * STRIDE]])  # overlap: 2 rows x 5 cols
    assert count_valid(a1, a2, GH, GW, float(STRIDE)) == 10
    seeds = np.arange(20000, dtype=np.uint64)
    matches, _, _ = sample_matches(np.repeat(a1[None], 20000, 0), np.repeat(a2[None], 20000, 0), seeds, 3,
                                   VIEW, STRIDE)
    counts = np.bincount(matches[..., 0].ravel(), minlength=GH * GW)
    cells = counts[counts > 0]
    assert len(cells) == 10
    expected = 20000 * 3 / 10
    assert np.abs(cells - expected).max() < 5 * math.sqrt(expected)
    assert all(len(set(row)) == 3 for row in matches[:200, :, 0].tolist())


def test_deterministic_and_independent_of_batch_and_threads():
    rng = np.random.default_rng(1)
    pairs = [sample_view_pair(seed, 300, 400, PairSpec(size=VIEW, stride=STRIDE)) for seed in range(64)]
    a1, a2 = np.stack([p.affine1 for p in pairs]), np.stack([p.affine2 for p in pairs])
    seeds = rng.integers(0, 2**63, 64).astype(np.uint64)
    par = sample_matches(a1, a2, seeds, 32, VIEW, STRIDE, parallel=True)
    ser = sample_matches(a1, a2, seeds, 32, VIEW, STRIDE, parallel=False)
    for x, y in zip(par, ser):
        np.testing.assert_array_equal(x, y)
    alone = sample_matches(a1[5], a2[5], seeds[5:6], 32, VIEW, STRIDE)
    np.testing.assert_array_equal(alone[0][0], par[0][5])
    other = sample_matches(a1, a2, seeds + np.uint64(1), 32, VIEW, STRIDE)
    assert not np.array_equal(other[0], par[0])


def test_bad_input_is_rejected():
    eye = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    with pytest.raises(ValueError, match="singular"):
        flow(np.zeros((2, 3)), eye, VIEW, STRIDE)
    with pytest.raises(ValueError, match="multiple of the feature stride"):
        flow(eye, eye, (30, 32), 4)
    with pytest.raises(ValueError, match="one seed per pair"):
        sample_matches(eye, eye, [1, 2], 4, VIEW, STRIDE)
    with pytest.raises(ValueError, match="num_matches"):
        sample_matches(eye, eye, [1], GH * GW + 1, VIEW, STRIDE)


def test_floor_of_match_xy2_is_the_view2_cell():
    """The contract: a match's view-2 cell is ``floor(match_xy2)``. Positions are computed in float64 and stored
    as float32; rounding must not carry a position onto the next cell's edge (it did for ~0.1% of matches)."""
    rng = np.random.default_rng(0)
    spec = PairSpec(size=(224, 224))
    pairs = [sample_view_pair(seed, int(rng.integers(50, 900)), int(rng.integers(50, 900)), spec)
             for seed in range(3000)]
    matches, xy2, _ = sample_matches(np.stack([p.affine1 for p in pairs]), np.stack([p.affine2 for p in pairs]),
                                     np.array([p.match_seed for p in pairs], np.uint64), 32, spec.size, spec.stride)
    assert xy2.dtype == np.float32
    gw = spec.grid[1]
    cells = np.floor(xy2[..., 1]).astype(np.int64) * gw + np.floor(xy2[..., 0]).astype(np.int64)
    np.testing.assert_array_equal(cells, matches[..., 1])
