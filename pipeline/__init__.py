"""The view engine: specs of views, geometry, correspondence kernels, loaders and device-side augmentation.

Importing this package loads only numpy, numba, torch and the JPEG decoder; the DALI and FFCV backends are
separate modules that ``build_loader`` imports on demand. The specs live in ``views.py``, the batch contract in
``contract.py``.
"""

from .augment import PhotometricAugment
from .contract import BATCH, PAIR_BATCH, ViewLoader, as_pair, check_batch, matched_views, pack_views, unpack_views
from .correspondence import flow, sample_matches
from .factory import BACKENDS, DataConfig, build_loader, preview_images
from .folder import decode_rgb
from .geometry import Crop, ViewPair, crop_affine, invert_affine, sample_view_pair, view_params
from .index import DataIndex, data_index, scan_image_folder
from .loader import SeededSampler
from .views import MultiCropViews, PairRule, PairSpec, ViewGroup, ViewSpec

__all__ = [
    "BACKENDS", "BATCH", "Crop", "DataConfig", "DataIndex", "MultiCropViews", "PAIR_BATCH", "PairRule", "PairSpec",
    "PhotometricAugment", "SeededSampler", "ViewGroup", "ViewLoader", "ViewPair", "ViewSpec", "as_pair",
    "build_loader", "check_batch", "crop_affine", "data_index", "decode_rgb", "flow", "invert_affine",
    "matched_views", "pack_views", "preview_images", "sample_matches", "sample_view_pair", "scan_image_folder", "unpack_views", "view_params",
]
