"""What decoding only the two windows of a pair would save (issue 20): each way of decoding part of a JPEG
against the same decoder decoding the whole image, on the same files, one core.

    python -m densessl.benchmarks.partial_decode [--data photos] [--reps 3] [--size 224]

Every file gets one view pair from our sampler (``geometry.view_params``; the seed is the file's index). The
region to decode is the union box of the two windows, and M/8 is the smallest libjpeg scale that keeps both
windows at least ``--size`` pixels on each side (8/8 when none does). Rows, each as img/s and as a multiple of
its own decoder's whole-image rate:

- libjpeg's scanline API (``partial_decode.c``, compiled here with ``cc``; skipped without a compiler or
  jpeglib.h): the whole image; the union (``jpeg_crop_scanline`` + ``jpeg_skip_scanlines``, stopping after the
  last row); the union at M/8; the union at M/8 with M restricted to 1, 2, 4 or 8.
- FFCV's compiled ``imdecode`` (libturbojpeg): the whole image, and the union cut by ``tjTransform`` with
  ``TJXOPT_CROP`` (lossless crop to a new JPEG, then decode), which is what its crop arguments do.
- DALI's CPU decoders, one thread: ``decoders.image`` and ``decoders.image_slice`` on the union.
- simplejpeg, the reference loader's decoder, on the whole image, for scale.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import simplejpeg

from densessl.pipeline import PairSpec
from densessl.pipeline.index import scan_image_folder
from densessl.pipeline.geometry import view_params

from .common import machine
from .loader import DATA_HELP, resolve_data

# (width, height) of a JPEG's iMCU, by simplejpeg's subsampling name: TJXOPT_CROP needs x, y multiples of it
IMCU = {"444": (8, 8), "422": (16, 8), "420": (16, 16), "440": (8, 16), "411": (32, 8), "441": (8, 32),
        "Gray": (8, 8)}


def plan(data: bytes, seed: int, spec: PairSpec) -> dict:
    """The union of one pair's windows (source pixels), its iMCU-aligned version, and the scale M/8."""
    h, w, subsampling, _ = simplejpeg.decode_jpeg_header(data)
    windows, _ = view_params(seed, h, w, spec.view_spec)
    top, left = windows[:, 0].min(), windows[:, 1].min()
    bottom, right = (windows[:, 0] + windows[:, 2]).max(), (windows[:, 1] + windows[:, 3]).max()
    mx, my = IMCU.get(subsampling, (16, 16))
    atop, aleft = top // my * my, left // mx * mx
    smallest = windows[:, 2].min() / spec.size[0], windows[:, 3].min() / spec.size[1]
    m = next(m for m in range(1, 9) if m == 8 or min(smallest) * m / 8 >= 1)
    return {"h": h, "w": w, "top": int(top), "left": int(left), "height": int(bottom - top),
            "width": int(right - left), "atop": int(atop), "aleft": int(aleft), "aheight": int(bottom - atop),
            "awidth": int(right - aleft), "m": m, "m_pow2": min(k for k in (1, 2, 4, 8) if k >= m)}


def rate(decode, items, reps: int) -> list[float]:
    """img/s of ``decode(data, plan)`` over all items, ``reps`` times after one untimed pass."""
    for data, p in items:
        decode(data, p)
    runs = []
    for _ in range(reps):
        start = time.perf_counter()
        for data, p in items:
            decode(data, p)
        runs.append(len(items) / (time.perf_counter() - start))
    return runs


def scanline_decoder():
    """``decode(data, top, left, height, width, m)`` -> the decoded rows of that region at scale m/8 (HxWx3,
    widened to iMCU columns) and the first column's index, through ``decode_region`` in partial_decode.c,
    compiled into a temporary library (removed once loaded: the loaded copy stays mapped); None if it cannot be
    built here."""
    source = Path(__file__).with_name("partial_decode.c")
    with tempfile.TemporaryDirectory(prefix="partial_decode-") as scratch:
        out = Path(scratch) / "libregion.so"
        try:
            subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(out), str(source), "-ljpeg"], check=True,
                           capture_output=True)
        except (OSError, subprocess.CalledProcessError) as err:
            print(f"libjpeg scanline rows skipped: cannot build partial_decode.c ({err})")
            return None
        lib = ctypes.CDLL(str(out))
    lib.decode_region.argtypes = ([ctypes.c_char_p, ctypes.c_ulong] + [ctypes.c_int] * 5 +
                                  [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)])
    lib.decode_region.restype = ctypes.c_int
    buffer = np.empty(64 << 20, np.uint8)
    first, columns = ctypes.c_int(), ctypes.c_int()

    def decode(data: bytes, top: int, left: int, height: int, width: int, m: int) -> tuple[np.ndarray, int]:
        if lib.decode_region(data, len(data), top, left, height, width, m, buffer.ctypes.data, first,
                             columns) != 0:
            raise ValueError("libjpeg could not decode a file")
        rows = -(-(top + height) * m // 8) - top * m // 8
        return buffer[:rows * columns.value * 3].reshape(rows, columns.value, 3), first.value
    return decode


def ffcv_rows(items, reps: int) -> dict[str, list[float]]:
    try:
        from ffcv.libffcv import imdecode
    except ImportError:
        print("FFCV rows skipped: ffcv is not installed")
        return {}
    buffer = np.empty(64 << 20, np.uint8)
    arrays = [(np.frombuffer(d, np.uint8), p) for d, p in items]

    def whole(a, p):
        assert imdecode(a, buffer, p["h"], p["w"], p["h"], p["w"], 0, 0, 1, 1, False, False) == 0

    def union(a, p):
        assert imdecode(a, buffer, p["h"], p["w"], p["aheight"], p["awidth"], p["aleft"], p["atop"], 1, 1, True,
                        False) == 0
    return {"FFCV imdecode, whole image": rate(whole, arrays, reps),
            "FFCV imdecode, union (tjTransform crop)": rate(union, arrays, reps)}


def dali_rows(items, reps: int, batch: int = 32) -> dict[str, list[float]]:
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError:
        print("DALI rows skipped: nvidia-dali is not installed")
        return {}
    batch = min(batch, len(items))
    usable = len(items) // batch * batch
    datas = [np.frombuffer(d, np.uint8) for d, _ in items[:usable]]
    anchors = [np.array([p["left"], p["top"]], np.float32) for _, p in items[:usable]]
    shapes = [np.array([p["width"], p["height"]], np.float32) for _, p in items[:usable]]

    def sample(info):
        i = info.idx_in_epoch % usable
        return datas[i], anchors[i], shapes[i]

    out = {}
    for name, sliced in (("DALI CPU decoders.image, whole image", False),
                         ("DALI CPU decoders.image_slice, union", True)):
        @pipeline_def(batch_size=batch, num_threads=1, device_id=None, seed=0)
        def graph():
            data, anchor, shape = fn.external_source(source=sample, num_outputs=3, batch=False,
                                                     dtype=[types.UINT8, types.FLOAT, types.FLOAT])
            if sliced:
                return fn.decoders.image_slice(data, anchor, shape, device="cpu", output_type=types.RGB,
                                               normalized_anchor=False, normalized_shape=False)
            return fn.decoders.image(data, device="cpu", output_type=types.RGB)
        pipe = graph()
        pipe.build()
        pipe.run()
        runs = []
        for _ in range(reps):
            start = time.perf_counter()
            for _ in range(usable // batch):
                pipe.run()
            runs.append(usable / (time.perf_counter() - start))
        out[name] = runs
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="photos", help=DATA_HELP)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--size", type=int, default=224, help="view size (both sides)")
    args = p.parse_args(argv)
    spec = PairSpec(size=(args.size, args.size))
    files = [f for f in scan_image_folder(resolve_data(args.data)).files if f.lower().endswith((".jpg", ".jpeg"))]
    items = []
    for i, path in enumerate(files):
        data = Path(path).read_bytes()
        items.append((data, plan(data, i, spec)))
    plans = [pl for _, pl in items]
    area = statistics.mean(pl["height"] * pl["width"] / (pl["h"] * pl["w"]) for pl in plans)
    aligned = statistics.mean(pl["aheight"] * pl["awidth"] / (pl["h"] * pl["w"]) for pl in plans)
    ms = np.bincount([pl["m"] for pl in plans], minlength=9)[1:]
    print(f"partial decoding, one core; {machine()}; {len(items)} JPEGs from {args.data}, {args.size}px views")
    print(f"union of the two windows: {100 * area:.0f}% of the image ({100 * aligned:.0f}% iMCU-aligned); pairs "
          f"whose windows allow M/8 < 1: {100 * (1 - ms[7] / len(plans)):.0f}% (M=1..8: {ms.tolist()})")

    rows: dict[str, list[float]] = {}
    rows["simplejpeg, whole image"] = rate(lambda d, pl: simplejpeg.decode_jpeg(d, colorspace="RGB"), items,
                                           args.reps)
    region = scanline_decoder()
    if region is not None:
        rows["libjpeg scanlines, whole image"] = rate(
            lambda d, pl: region(d, 0, 0, pl["h"], pl["w"], 8), items, args.reps)
        rows["libjpeg scanlines, union"] = rate(
            lambda d, pl: region(d, pl["top"], pl["left"], pl["height"], pl["width"], 8), items, args.reps)
        rows["libjpeg scanlines, union at M/8"] = rate(
            lambda d, pl: region(d, pl["top"], pl["left"], pl["height"], pl["width"], pl["m"]), items, args.reps)
        rows["libjpeg scanlines, union at M/8, M in 1,2,4,8"] = rate(
            lambda d, pl: region(d, pl["top"], pl["left"], pl["height"], pl["width"], pl["m_pow2"]), items,
            args.reps)
    rows.update(ffcv_rows(items, args.reps))
    rows.update(dali_rows(items, args.reps))

    wholes = {"libjpeg": "libjpeg scanlines, whole image", "FFCV": "FFCV imdecode, whole image",
              "DALI": "DALI CPU decoders.image, whole image", "simplejpeg": "simplejpeg, whole image"}
    print(f"{'decode':48s} {'img/s':>8s} {'[min-max]':>15s}  of its whole-image rate")
    for name, runs in rows.items():
        whole = rows.get(wholes[name.split()[0].rstrip(",")])
        ratio = f"{statistics.median(runs) / statistics.median(whole):5.2f}x" if whole else ""
        print(f"{name:48s} {statistics.median(runs):8,.0f} [{min(runs):6,.0f}-{max(runs):6,.0f}]  {ratio}")


if __name__ == "__main__":
    main()
