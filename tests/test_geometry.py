import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.transforms import RandomResizedCrop

from densessl.pipeline import PairSpec
from densessl.pipeline.correspondence import count_valid, flow
from densessl.pipeline.geometry import Crop, crop_affine, invert_affine, sample_view_pair
from geometry_reference import apply_affine, compose, crop_overlap_cells, sample_crop_window

sizes = st.integers(1, 2000)


@st.composite
def crops(draw):
    h, w = draw(st.integers(8, 600)), draw(st.integers(8, 600))
    ch, cw = draw(st.integers(1, h)), draw(st.integers(1, w))
    return (h, w), Crop(draw(st.integers(0, h - ch)), draw(st.integers(0, w - cw)), ch, cw, draw(st.booleans()))


@given(crops(), st.sampled_from([(224, 224), (64, 96), (32, 32)]))
def test_crop_affine_maps_crop_box_onto_view(case, out_hw):
    _, crop = case
    a = crop_affine(crop, out_hw)
    corners = np.array([[crop.left, crop.top], [crop.left + crop.width, crop.top + crop.height]], float)
    got = apply_affine(a, corners)
    x0, x1 = (out_hw[1], 0) if crop.flip else (0, out_hw[1])
    np.testing.assert_allclose(got, [[x0, 0], [x1, out_hw[0]]], atol=1e-9)


@given(crops())
def test_flip_mirrors_pixel_centres(case):
    _, crop = case
    plain = crop_affine(Crop(crop.top, crop.left, crop.height, crop.width, False), (56, 80))
    flipped = crop_affine(Crop(crop.top, crop.left, crop.height, crop.width, True), (56, 80))
    pts = np.array([[crop.left + 0.5, crop.top + 0.5], [crop.left + crop.width / 3, crop.top + 1.0]])
    p, f = apply_affine(plain, pts), apply_affine(flipped, pts)
    np.testing.assert_allclose(f[:, 0], 80 - p[:, 0], atol=1e-9)
    np.testing.assert_allclose(f[:, 1], p[:, 1], atol=1e-9)


affines = st.builds(
    lambda ang, sx, sy, shear, tx, ty: np.array(
        [[sx * math.cos(ang), -sy * math.sin(ang) + shear, tx], [sx * math.sin(ang), sy * math.cos(ang), ty]]),
    st.floats(-math.pi, math.pi), st.floats(0.2, 5), st.floats(0.2, 5), st.floats(-0.5, 0.5),
    st.floats(-300, 300), st.floats(-300, 300))


@given(affines, st.lists(st.tuples(st.floats(-500, 500), st.floats(-500, 500)), min_size=1, max_size=5))
def test_inverse_and_compose_round_trip(a, pts):
    pts = np.array(pts)
    np.testing.assert_allclose(apply_affine(compose(invert_affine(a), a), pts), pts, atol=1e-6)
    np.testing.assert_allclose(apply_affine(compose(a, invert_affine(a)), pts), pts, atol=1e-6)


@given(sizes, sizes, st.integers(0, 2**32))
def test_crop_window_inside_image_and_within_ranges(h, w, seed):
    top, left, ch, cw = sample_crop_window(seed, h, w)
    assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0


@pytest.mark.parametrize("h,w", [(10, 1000), (1000, 10), (2, 50), (1, 1), (7, 2000)])
def test_fallback_matches_torchvision(h, w):
    ours = sample_crop_window(0, h, w)
    theirs = RandomResizedCrop.get_params(torch.zeros(1, h, w), scale=[0.2, 1.0], ratio=[3 / 4, 4 / 3])
    assert ours == tuple(theirs)


def test_crop_statistics_match_torchvision():
    """Same distribution as torchvision: mean area fraction and aspect ratio on a 375x500 image."""
    ours = np.array([sample_crop_window(seed, 375, 500)[2:] for seed in range(4000)], float)
    torch.manual_seed(0)
    theirs = np.array([RandomResizedCrop.get_params(torch.zeros(1, 375, 500), [0.2, 1.0], [3 / 4, 4 / 3])[2:]
                       for _ in range(4000)], float)
    for stat in (lambda c: c[:, 0] * c[:, 1] / (375 * 500), lambda c: np.log(c[:, 1] / c[:, 0])):
        a, b = stat(ours), stat(theirs)
        assert abs(a.mean() - b.mean()) < 4 * math.hypot(a.std(), b.std()) / math.sqrt(4000)


@settings(max_examples=60, deadline=None)
@given(st.integers(4, 1200), st.integers(4, 1200), st.integers(0, 2**32), st.sampled_from([1, 32, 500]))
def test_view_pairs_share_min_matches(h, w, seed, min_matches):
    spec = PairSpec(size=(96, 128), num_matches=1, min_matches=min_matches)
    pair = sample_view_pair(seed, h, w, spec)
    assert count_valid(pair.affine1, pair.affine2, 24, 32, 4.0) >= min_matches
    valid = np.isfinite(flow(pair.affine1, pair.affine2, (96, 128), 4)[..., 0]).sum()
    assert valid == count_valid(pair.affine1, pair.affine2, 24, 32, 4.0)
    for crop, a in ((pair.crop1, pair.affine1), (pair.crop2, pair.affine2)):
        np.testing.assert_array_equal(a, crop_affine(crop, spec.size))


@settings(max_examples=300, deadline=None)
@given(crops(), st.data())
def test_exact_overlap_formula_equals_the_kernel_count(case, data):
    (h, w), c1 = case
    ch, cw = data.draw(st.integers(1, h)), data.draw(st.integers(1, w))
    c2 = Crop(data.draw(st.integers(0, h - ch)), data.draw(st.integers(0, w - cw)), ch, cw, data.draw(st.booleans()))
    view = data.draw(st.sampled_from([(224, 224), (64, 96)]))
    a1, a2 = crop_affine(c1, view), crop_affine(c2, view)
    assert crop_overlap_cells(c1, c2, view, 4) == count_valid(a1, a2, view[0] // 4, view[1] // 4, 4.0)


def test_view_pair_rejects_impossible_requests():
    with pytest.raises(ValueError, match="exceeds the 64 cells"):
        PairSpec(size=(32, 32), min_matches=65)
    with pytest.raises(ValueError, match="no pixels"):
        sample_view_pair(0, 0, 100, PairSpec())
    with pytest.raises(ValueError, match="scale"):
        PairSpec(scale=(0.5, 0.2))


def test_overlap_count_on_exact_ties():
    """Crop 2's edges sit exactly on view-1 cell centres (every 4 px here): the float kernel must decide ties
    as exact arithmetic does."""
    c1 = Crop(0, 0, 64, 64, False)
    for left in range(0, 24):
        for width in (2, 4, 6, 8, 30, 40):
            for flip in (False, True):
                c2 = Crop(left, left, width, width, flip)
                a1, a2 = crop_affine(c1, (64, 64)), crop_affine(c2, (64, 64))
                assert crop_overlap_cells(c1, c2, (64, 64), 4) == count_valid(a1, a2, 16, 16, 4.0), (left, width)
