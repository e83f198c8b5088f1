"""ImageFolder scanning and decoding shared by every backend.

The sample order (sorted classes, then sorted file names) is the same as torchvision's ``ImageFolder``, so a
dataset index means the same file in every backend and in the DALI / FFCV file lists built from it.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# The formats PIL may read (the README promises ROOT/<class>/<image>.jpg|png). PIL otherwise picks any of its
# plugins from a file's bytes, whatever its name: a ".jpg" holding EPS would run Ghostscript on the data set file.
FORMATS = ("JPEG", "PNG")


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
    visited = {_identity(root)}  # every class folder is claimed first: a link into one from another is not followed
    tops = [(label, root / cls) for label, cls in enumerate(classes) if _first_visit(root / cls, visited)]
    for label, top in tops:
        for dirpath, names in _walk_once(top, visited):
            for name in sorted(names):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.join(dirpath, name))
                    labels.append(label)
    if not files:
        raise ValueError(f"data folder {root} has class folders but no {'/'.join(IMAGE_EXTENSIONS)} images")
    return ImageFolder(root, tuple(files), np.asarray(labels, np.int64), tuple(classes))


def _identity(path) -> tuple[int, int]:
    st = os.stat(path)  # follows links: the directory a path leads to
    return st.st_dev, st.st_ino


def _first_visit(path, visited: set) -> bool:
    """Whether ``path`` leads to a directory not scanned yet (then it is marked scanned); else warn, once per
    link, that it is not followed."""
    try:
        key = _identity(path)
    except OSError:  # a dangling link or no permission: os.walk skips it as well
        return False
    if key in visited:
        warnings.warn(f"not following {path}: it leads to a folder already scanned (a symlink loop or a second "
                      "link to the same folder); its images are listed once")
        return False
    visited.add(key)
    return True


def _walk_once(top: Path, visited: set):
    """``(dirpath, names)`` of ``os.walk(top, followlinks=True)`` entering each real directory (device, inode) once
    over the whole scan, by the first path that reaches it in scan order. Links are followed so that a data set
    can be assembled from links; without this a link to an ancestor lists its images once per lap (until the
    path is too long), and two such links per folder make the scan exponential."""
    for dirpath, dirnames, names in os.walk(top, followlinks=True):
        dirnames[:] = [d for d in sorted(dirnames) if _first_visit(os.path.join(dirpath, d), visited)]
        yield dirpath, names


MAX_PIXELS = 1 << 27  # 134M pixels (400 MB as RGB): larger images are treated as decompression bombs

# EXIF orientation -> the PIL transpose that shows the image upright (as PIL's ImageOps.exif_transpose does)
_ORIENT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


class BadImage(ValueError):
    """A file that cannot be a training image; the message says why."""


def _open(data: bytes) -> Image.Image:
    """PIL's ``Image.open`` restricted to ``FORMATS``; anything else is a ``BadImage``."""
    try:
        return Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise BadImage(f"not a {' or '.join(FORMATS)} image") from None


def _orientation(data: bytes) -> int:
    if b"Exif\x00\x00" not in data[:65536]:  # no EXIF block: the common case costs one byte search
        return 1
    try:
        with _open(data) as im:
            return int(im.getexif().get(0x0112, 1))
    except Exception:  # unreadable EXIF: decode as stored
        return 1


def decode_rgb(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode to an upright HxWx3 uint8 array, or raise ``BadImage``.

    libjpeg-turbo (simplejpeg, measured fastest here) for JPEG, strict about truncation; PIL otherwise (CMYK
    JPEG, PNG; 16-bit images are scaled to 8 bits, alpha is dropped), limited to ``FORMATS``: any other format is
    a ``BadImage``, never handed to another PIL plugin. EXIF orientation is applied, as DALI's decoder and
    peek_image_shape do, so geometry always refers to the upright image. The pixel count is checked from the
    header before decoding.
    """
    if not data:
        raise BadImage("empty file")
    try:
        image = None
        if data[:2] == b"\xff\xd8":
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
            _check_size(h, w, max_pixels)
            try:
                image = simplejpeg.decode_jpeg(data, colorspace="RGB")
            except ValueError as err:  # CMYK JPEGs: libjpeg-turbo cannot convert them; PIL can
                if "Premature end" in str(err) or "corrupt" in str(err).lower():
                    raise
        if image is None:
            image = _decode_pil(data, max_pixels)
    except BadImage:
        raise
    except Exception as err:  # truncated, corrupt, or not an image at all
        raise BadImage(f"cannot decode: {err}") from None
    orientation = _orientation(data)
    if orientation in _ORIENT:
        image = np.asarray(Image.fromarray(image).transpose(_ORIENT[orientation]))
    return image


def _check_size(h: int, w: int, max_pixels: int) -> None:
    if h * w > max_pixels:
        raise BadImage(f"{w}x{h} pixels exceeds max_pixels={max_pixels} (decompression bomb?)")
    if h < 1 or w < 1:
        raise BadImage(f"{w}x{h} image")


def _decode_pil(data: bytes, max_pixels: int) -> np.ndarray:
    with _open(data) as im:
        _check_size(im.height, im.width, max_pixels)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: keep the top 8 bits, not a clip at 255
            grey = (np.asarray(im, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8)
            return np.repeat(grey[..., None], 3, axis=2)
        return np.asarray(im.convert("RGB"))


MAX_REPLACEMENTS = 64


def read_first_readable(files, index: int, skip_log: str | None = None, warn: bool = True) -> tuple[int, np.ndarray]:
    """``(j, pixels)`` of the first file from ``files[index]`` on (wrapping around) that decodes: how every
    backend replaces a bad file, deterministically. Each file passed over is warned about and appended to
    ``skip_log`` (path, reason); one short O_APPEND write per line is safe across worker processes."""
    for k in range(MAX_REPLACEMENTS):
        j = (index + k) % len(files)
        try:
            with open(files[j], "rb") as f:
                return j, decode_rgb(f.read())
        except (BadImage, OSError) as err:
            reason = str(err).replace("\n", " ").replace("\t", " ")
            if warn:
                warnings.warn(f"skipping {files[j]}: {reason}", stacklevel=2)
            if skip_log:
                with open(skip_log, "a") as log:
                    log.write(f"{files[j]}\t{reason}\n")
    raise RuntimeError(f"{MAX_REPLACEMENTS} consecutive unreadable files from {files[index]}; "
                       "is the data folder damaged?")


def screen_file(path: str, max_pixels: int = MAX_PIXELS) -> str | None:
    """Why ``path`` cannot be a training image, from its header and its last bytes (no decode), or None.

    Catches empty and non-image files, decompression bombs and truncated JPEG/PNG files (no end marker): what
    makes a decoder inside a compiled pipeline (DALI) abort. Costs tens of microseconds per file.
    """
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file"
        with open(path, "rb") as f:
            head = f.read(65536)
            f.seek(max(0, size - 4096))
            tail = f.read()
        if head[:2] == b"\xff\xd8":
            h, w, _, _ = simplejpeg.decode_jpeg_header(head if size <= 65536 else head + tail)
            if b"\xff\xd9" not in tail:
                return "truncated JPEG (no end-of-image marker)"
        else:
            with _open(head) as im:
                w, h = im.size
            if head[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in tail:
                return "truncated PNG (no IEND chunk)"
        _check_size(h, w, max_pixels)
    except BadImage as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - any unreadable header is a bad file
        return f"unreadable header: {err}"
    return None


def screen_files(files, skip_log: str | None = None, threads: int = 8) -> list[int]:
    """Indices of the files that pass ``screen_file``; the others are warned about and appended to ``skip_log``."""
    from concurrent.futures import ThreadPoolExecutor

    from .progress import progress

    with ThreadPoolExecutor(threads) as pool:
        reasons = list(progress(pool.map(screen_file, files, chunksize=256), "screening files", len(files), "file",
                                enabled=len(files) >= 50_000))
    bad = [(f, r) for f, r in zip(files, reasons) if r]
    for f, r in bad[:20]:
        warnings.warn(f"skipping {f}: {r}", stacklevel=2)
    if bad and skip_log:
        with open(skip_log, "a") as log:
            log.writelines(f"{f}\t{r}\n" for f, r in bad)
    return [i for i, r in enumerate(reasons) if r is None]
