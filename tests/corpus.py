"""A corpus of awkward and broken image files, written by the reliability tests."""

import io
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

BAD = ("truncated.jpg", "empty.jpg", "text.jpg", "bomb.png")  # what every backend must skip and report


def _scene(h, w, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), np.full_like(x, 128)], -1)
    return np.clip(base + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels: a decompression bomb caught before decoding."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + b"\x00\x00\x00\x00IEND\xaeB`\x82")


def write_corpus(root: Path, good: int = 8) -> Path:
    """ROOT/a/*: ``good`` ordinary JPEGs plus every awkward case; ROOT/b/*: ordinary JPEGs."""
    a, b = root / "a", root / "b"
    a.mkdir(parents=True)
    b.mkdir()
    for i in range(good):
        Image.fromarray(_scene(96, 128, i)).save(a / f"good{i}.jpg", quality=90)
        Image.fromarray(_scene(128, 96, 100 + i)).save(b / f"good{i}.jpg", quality=90)
    scene = _scene(96, 128, 7)
    buf = io.BytesIO()
    Image.fromarray(scene).save(buf, "JPEG", quality=90)
    (a / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (a / "empty.jpg").write_bytes(b"")
    (a / "text.jpg").write_text("this is not an image\n")
    (a / "bomb.png").write_bytes(_png_header_only(40000, 40000))
    Image.fromarray(scene).convert("CMYK").save(a / "cmyk.jpg", quality=90)
    Image.fromarray(scene).convert("L").save(a / "gray.jpg", quality=90)
    rgba = np.dstack([scene, np.full(scene.shape[:2], 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(a / "alpha.png")
    Image.fromarray(scene[..., 0].astype(np.uint16) * 257).save(a / "deep16.png")  # 16-bit grey
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    Image.fromarray(_scene(96, 160, 9)).save(a / "rotated.jpg", quality=90, exif=exif.tobytes())
    Image.fromarray(_scene(12, 10, 10)).save(a / "tiny.jpg", quality=90)
    Image.fromarray(_scene(24, 1200, 11)).save(a / "wide.jpg", quality=90)
    return root


def write_screening_extras(root: Path) -> Path:
    """ROOT/x/*: JPEG structures that screening reads in parts (large metadata segments, progressive scans,
    trailing bytes, headers cut short) and PNGs whole or cut."""
    x = root / "x"
    x.mkdir(parents=True)
    image = _scene(300, 400, 21)
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010E] = "x" * 30000  # an EXIF segment of 30 KB before the frame header
    Image.fromarray(image).save(x / "bigexif.jpg", exif=exif.tobytes(), quality=90)
    Image.fromarray(image).save(x / "progressive.jpg", progressive=True, quality=90)
    Image.fromarray(image).save(x / "icc.jpg", icc_profile=b"\0" * 20000, quality=90)
    big = (x / "bigexif.jpg").read_bytes()
    (x / "bigexif_cut.jpg").write_bytes(big[:len(big) - 5000])
    (x / "header_only.jpg").write_bytes(big[:1500])
    progressive = (x / "progressive.jpg").read_bytes()
    (x / "trailing3k.jpg").write_bytes(progressive + b"\0" * 3000)
    (x / "trailing5k.jpg").write_bytes(progressive + b"\0" * 5000)
    (x / "soi_then_zeros.jpg").write_bytes(b"\xff\xd8" + b"\0" * 5000 + b"\xff\xd9")
    (x / "three_bytes.jpg").write_bytes(b"\xff\xd8\xff")
    Image.fromarray(image).save(x / "whole.png")
    (x / "cut.png").write_bytes((x / "whole.png").read_bytes()[:-20])
    return root


if __name__ == "__main__":
    import sys
    out = Path(sys.argv[1])
    shutil.rmtree(out, ignore_errors=True)
    write_corpus(out)
