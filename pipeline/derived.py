"""What other methods consume, derived from the views' affines on the device, in plain torch: nothing is carried
through the resize (CrOC and CrIBo carry an 800 MB coordinate grid; here a view is six numbers).

Every function takes affines ``[..., 2, 3]`` from source pixels to view pixels (pixel centres at +0.5, as in
``geometry``) and view sizes ``(H, W)``, and broadcasts over the leading dimensions. Boxes are ``(x0, y0, x1, y1)``
in continuous pixel coordinates, the layout ``torchvision.ops.roi_align`` takes (with ``aligned=True``).
"""

from __future__ import annotations

import torch

from .correspondence import _TIE as TIE


def invert(affines: torch.Tensor) -> torch.Tensor:
    """View pixels -> source pixels."""
    lin = torch.linalg.inv(affines[..., :2, :2])
    return torch.cat([lin, -lin @ affines[..., :2, 2:]], -1)


def apply(affines: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Points ``[..., K, 2]`` (x, y) through affines ``[..., 2, 3]``."""
    return xy @ affines[..., :2, :2].transpose(-1, -2) + affines[..., None, :2, 2]


def _box_of(points: torch.Tensor) -> torch.Tensor:
    return torch.cat([points.amin(-2), points.amax(-2)], -1)


def view_boxes(affines: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Each view's window in source pixels: ``[..., 4]``."""
    h, w = size
    corners = affines.new_tensor([[0.0, 0.0], [w, h]]).expand(*affines.shape[:-2], 2, 2)
    return _box_of(apply(invert(affines), corners))


def intersection_boxes(affines_i: torch.Tensor, size_i, affines_j: torch.Tensor, size_j):
    """The source region two views share, in each view's own pixels: ``(box_in_i, box_in_j, overlaps)``, boxes
    ``[..., 4]`` ready for ``roi_align`` on each view's features (scale them by 1 / stride), and a bool that is
    False where the views do not overlap (the boxes are then empty, x0 == x1 or y0 == y1)."""
    a, b = view_boxes(affines_i, size_i), view_boxes(affines_j, size_j)
    lo, hi = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    overlaps = (hi - lo > 1e-4).all(-1)  # windows that only touch (in exact arithmetic) do not overlap
    hi = torch.maximum(hi, lo)
    corners = torch.stack([lo, hi], -2)
    return _box_of(apply(affines_i, corners)), _box_of(apply(affines_j, corners)), overlaps


def coordinate_map(affines: torch.Tensor, size: tuple[int, int], out_hw: tuple[int, int] | None = None):
    """The source (x, y) of each cell centre of a view resampled to ``out_hw`` (default: the view's pixels):
    ``[..., 2, h, w]``, CrOC/CrIBo's coordinate map at any resolution."""
    h, w = size
    oh, ow = out_hw or size
    ys = (torch.arange(oh, dtype=affines.dtype, device=affines.device) + 0.5) * (h / oh)
    xs = (torch.arange(ow, dtype=affines.dtype, device=affines.device) + 0.5) * (w / ow)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)  # [h*w, 2] (x, y)
    src = apply(invert(affines), grid.expand(*affines.shape[:-2], -1, 2))
    return src.transpose(-1, -2).reshape(*affines.shape[:-2], 2, oh, ow)


def grid_flow(affines_i: torch.Tensor, size_i, affines_j: torch.Tensor, size_j, stride: int = 4) -> torch.Tensor:
    """For each cell centre of view i's feature grid (``size_i / stride``), its continuous (x, y) position in view
    j's grid, NaN where it falls outside view j: ``[..., Gh_i, Gw_i, 2]``, ``...`` the leading dimensions of both
    affines broadcast (``correspondence.flow`` in torch)."""
    gh, gw = size_i[0] // stride, size_i[1] // stride
    src = coordinate_map(affines_i, size_i, (gh, gw))  # [..., 2, gh, gw]
    pts = src.flatten(-2).transpose(-1, -2)
    xy = apply(affines_j, pts) / stride
    gh_j, gw_j = size_j[0] // stride, size_j[1] // stride  # ties at the border as the kernel decides them
    inside = (xy[..., 0] >= -TIE) & (xy[..., 0] < gw_j - TIE) & (xy[..., 1] >= -TIE) & (xy[..., 1] < gh_j - TIE)
    xy = torch.where(inside[..., None], xy, torch.full_like(xy, float("nan")))
    return xy.unflatten(-2, (gh, gw))  # leading dims: those of affines_i and affines_j broadcast
