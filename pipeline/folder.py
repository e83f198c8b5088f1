"""ImageFolder scanning and decoding shared by every backend.

The sample order (sorted classes, then sorted file names) is the same as torchvision's ``ImageFolder``, so a
dataset index means the same file in every backend and in the DALI / FFCV file lists built from it.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class ImageFolder:
    root: Path
    files: tuple[str, ...]
    labels: np.ndarray  # int64 class index per file
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.files)


def scan_image_folder(root: str | os.PathLike) -> ImageFolder:
    """List ``root/<class>/<image>`` files; fails with a message that says what is wrong with the folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist (expected ROOT/<class>/<image>.jpg)")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"data folder {root} has no class sub-folders (expected ROOT/<class>/<image>.jpg)")
    files, labels = [], []
    for label, cls in enumerate(classes):
        for dirpath, dirnames, names in os.walk(root / cls, followlinks=True):
            dirnames.sort()
            for name in sorted(names):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.join(dirpath, name))
                    labels.append(label)
    if not files:
        raise ValueError(f"data folder {root} has class folders but no {'/'.join(IMAGE_EXTENSIONS)} images")
    return ImageFolder(root, tuple(files), np.asarray(labels, np.int64), tuple(classes))


def decode_rgb(data: bytes) -> np.ndarray:
    """Decode to an HxWx3 uint8 array: libjpeg-turbo (simplejpeg) for JPEG, measured fastest here; PIL otherwise."""
    if data[:2] == b"\xff\xd8":
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
        except ValueError:  # e.g. CMYK JPEGs, which libjpeg-turbo cannot convert to RGB itself
            pass
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))
