"""View-pair pipeline: geometry, correspondence kernels, loaders and device-side augmentation.

Importing this package loads only numpy, numba, torch and the JPEG decoder; the DALI and FFCV backends are
separate modules imported on demand. The batch contract every loader yields is documented in README.md here.
"""

from .augment import PhotometricAugment
from .correspondence import flow, sample_matches
from .folder import decode_rgb, scan_image_folder
from .geometry import Crop, ViewPair, ViewSpec, crop_affine, invert_affine, sample_view_pair
from .loader import CollateViewPairs, SeededSampler, ViewPairDataset, make_loader

BATCH_KEYS = ("view1", "view2", "geometry1", "geometry2", "matches", "match_xy2", "index")

__all__ = [
    "BATCH_KEYS", "Crop", "CollateViewPairs", "PhotometricAugment", "SeededSampler", "ViewPair",
    "ViewPairDataset", "ViewSpec", "crop_affine", "decode_rgb", "flow", "invert_affine", "make_loader",
    "sample_matches", "sample_view_pair", "scan_image_folder",
]
