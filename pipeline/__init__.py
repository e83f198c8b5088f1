"""View-pair pipeline: geometry, correspondence kernels, loaders and device-side augmentation.

Importing this package loads only numpy, numba, torch and the JPEG decoder; the DALI and FFCV backends are
separate modules that ``build_loader`` imports on demand. The loader contract lives in ``contract.py``.
"""

from .augment import PhotometricAugment
from .contract import BATCH, PairSpec, ViewPairLoader, assemble_batch, check_batch
from .correspondence import flow, sample_matches
from .factory import BACKENDS, DataConfig, build_loader, preview_images
from .folder import decode_rgb, scan_image_folder
from .geometry import Crop, ViewPair, crop_affine, invert_affine, sample_view_pair
from .loader import SeededSampler
from .multicrop import PairRule, ViewGroup, ViewSpec, check_views_batch

__all__ = [
    "BACKENDS", "BATCH", "Crop", "DataConfig", "PairRule", "PairSpec", "PhotometricAugment", "SeededSampler", "ViewPair",
    "ViewGroup", "ViewPairLoader", "ViewSpec", "check_views_batch",
    "assemble_batch", "build_loader", "check_batch", "crop_affine", "decode_rgb", "flow", "invert_affine",
    "preview_images", "sample_matches", "sample_view_pair", "scan_image_folder",
]
