"""A natural-photo benchmark set: ImageNet-like JPEGs cut from the colour photographs scikit-image ships in its
wheel, so loader numbers reflect what decoding real photos costs (procedural scenes decode far faster).

    python -m densessl.benchmarks.photos --out data/bench-photos --count 256

Each file is a random window of one photograph (random scale and aspect), resized to an ImageNet-like size
(500x375, 375x500, 500x333, 333x500, 500x500, and some larger ones), randomly mirrored, and saved as a 4:2:0
JPEG of quality 85-96. The same seed writes the same files. One class folder per source photograph.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
from PIL import Image

from densessl.pipeline import owned

# scikit-image's bundled colour photographs (no download needed)
SOURCES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
           "stereo_motorcycle")
# (width, height) and how often each appears: mostly ImageNet's common sizes, some larger images
SIZES = [((500, 375), 5), ((375, 500), 3), ((500, 333), 3), ((333, 500), 2), ((500, 500), 2), ((640, 480), 1),
         ((800, 1067), 1), ((1024, 768), 1)]


def _photographs() -> dict[str, np.ndarray]:
    try:
        from skimage import data
    except ImportError as err:
        raise ImportError("the photo benchmark set needs scikit-image: pip install -e '.[bench]'") from err
    out = {}
    for name in SOURCES:
        image = getattr(data, name)()
        out[name] = np.ascontiguousarray((image[0] if isinstance(image, tuple) else image)[..., :3])
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return ""


def write_photo_set(out: str | Path, count: int = 256, seed: int = 0) -> Path:
    """Write ``count`` JPEGs as ``OUT/train/<photograph>/<i>.jpg`` (once: a finished set of the same count and
    seed is reused; any other is replaced, only in a folder this writer made: ``pipeline.owned``)."""
    root, done = Path(out) / "train", Path(out) / ".complete"
    owned.claim(out, "photo-set", "--out",  # before markers: its .complete holds "COUNT SEED"
                legacy=lambda folder: re.fullmatch(r"\d+ \d+", _read(folder / ".complete")) is not None)
    if done.is_file() and done.read_text() == f"{count} {seed}":
        return root
    owned.replace(out, "photo-set", "--out")
    rng = np.random.default_rng(seed)
    photos = _photographs()
    names = sorted(photos)
    sizes, weights = zip(*SIZES)
    weights = np.array(weights, float) / sum(weights)
    for i in range(count):
        name = names[i % len(names)]
        source = photos[name]
        (w, h) = sizes[rng.choice(len(sizes), p=weights)]
        sh, sw = source.shape[:2]
        # the largest window of the target's aspect inside the photograph, scaled by 50-100%, placed anywhere
        fit = min(sw / w, sh / h) * rng.uniform(0.5, 1.0)
        cw, ch = max(1, round(w * fit)), max(1, round(h * fit))
        top, left = rng.integers(0, sh - ch + 1), rng.integers(0, sw - cw + 1)
        image = Image.fromarray(source[top:top + ch, left:left + cw]).resize((w, h), Image.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        (root / name).mkdir(parents=True, exist_ok=True)
        image.save(root / name / f"{i:05d}.jpg", quality=int(rng.integers(85, 97)), subsampling=2)
    done.write_text(f"{count} {seed}")
    return root


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/bench-photos")
    p.add_argument("--count", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        root = write_photo_set(args.out, args.count, args.seed)
    except owned.NotOurs as err:
        raise SystemExit(f"error: {err}") from None
    files = sorted(root.glob("*/*.jpg"))
    print(f"{len(files)} JPEGs in {root}, {np.mean([f.stat().st_size for f in files]) / 1e3:.0f} kB on average")


if __name__ == "__main__":
    main()
