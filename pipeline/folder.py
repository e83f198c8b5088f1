"""Decoding shared by every backend, and the rules for files that cannot be training images (``BadImage``): how a
decode refuses them and how every backend replaces them. The file list is ``index.py``'s, screening
``screening.py``'s."""

from __future__ import annotations

import io
import warnings

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

# The formats PIL may read (the README promises ROOT/<class>/<image>.jpg|png). PIL otherwise picks any of its
# plugins from a file's bytes, whatever its name: a ".jpg" holding EPS would run Ghostscript on the data set file.
FORMATS = ("JPEG", "PNG")
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
