"""What the GPU machine lacks, as wheels it can install with no network and no build (``make gpu-bundle``).

The machine (the ``device`` tool's ``nvidia-h200``) runs Python 3.12 with its own torch 2.11, torchvision,
numba, numpy, scipy, h5py, tensorboard, pillow, matplotlib, opencv, pytest and hypothesis, and nothing can be
fetched there. One command takes at most 64 MiB of files along. This writes, into ``--out`` (ignored by git):

- ``core/``: our wheel and the wheels of the dependencies its image does not have (``MISSING``), for CPython
  ``--python`` on manylinux x86-64, versions from constraints.txt; under 60 MiB, checked;
- with ``--dali``: ``dali/part-NN``, DALI's wheel and the wheels it needs beyond the image, packed into one tar
  and cut into parts under 60 MiB, sent one per command while the machine stays up (``benchmarks/gpu.sh
  --receive-dali``) and joined there; ``dali/SHA256`` checks the join.

``benchmarks/gpu.sh`` installs them. ``--python`` defaults to the machine's 3.12; the rehearsal in ``make test``
builds for the interpreter it runs under.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from densessl.pipeline import owned

REPO = Path(__file__).resolve().parents[1]
MISSING = ["simplejpeg", "submitit", "timm"]  # not in the GPU image, or (timm) at a version we did not test
DALI = ["nvidia-dali-cuda130", "nvidia-nvimgcodec-cu13", "nvidia-libnvcomp-cu13", "astunparse", "gast", "libcst",
        "makefun", "nvtx", "optree"]
LIMIT = 60 * 2**20  # bytes one command carries, with room for the working tree
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def pinned(names: list[str]) -> list[str]:
    """``name==version`` from constraints.txt (the tested set), for each of ``names``."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.strip().split("==", 1)
            pins[name.lower().replace("_", "-")] = version
    missing = [n for n in names if n.lower() not in pins]
    if missing:
        raise SystemExit(f"error: {missing} not pinned in constraints.txt")
    return [f"{n}=={pins[n.lower()]}" for n in names]


def download(requirements: list[str], out: Path, python: str) -> None:
    args = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
            python, "--implementation", "cp", "-d", str(out)]
    for platform in PLATFORMS:
        args += ["--platform", platform]
    subprocess.run(args + requirements, check=True)


def size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def build_core(out: Path, python: str) -> Path:
    core = out / "core"
    shutil.rmtree(core, ignore_errors=True)
    core.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(core),
                    str(REPO)], check=True)
    download(pinned(MISSING), core, python)
    if size(core) > LIMIT:
        raise SystemExit(f"error: {core} holds {size(core) / 2**20:.1f} MiB, over the {LIMIT // 2**20} MiB one "
                         "command can carry")
    return core


def split(path: Path, folder: Path, part_bytes: int = LIMIT) -> list[Path]:
    """``path`` cut into ``part-NN`` files of at most ``part_bytes``, and ``SHA256`` of the whole."""
    folder.mkdir(parents=True, exist_ok=True)
    parts, digest = [], hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(part_bytes):
            digest.update(chunk)
            part = folder / f"part-{len(parts):02d}"
            part.write_bytes(chunk)
            parts.append(part)
    (folder / "SHA256").write_text(f"{digest.hexdigest()}  {len(parts)} parts\n")
    return parts


def build_dali(out: Path, python: str) -> list[Path]:
    wheels = out / "dali-wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    download(pinned(DALI), wheels, python)
    tar = out / "dali.tar"
    with tarfile.open(tar, "w") as t:  # wheels are zip files already: no compression
        for wheel in sorted(wheels.glob("*.whl")):
            t.add(wheel, arcname=wheel.name)
    shutil.rmtree(out / "dali", ignore_errors=True)
    parts = split(tar, out / "dali")
    tar.unlink()
    shutil.rmtree(wheels)
    return parts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m densessl.benchmarks.gpu_bundle", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / ".gpu-bundle"))
    p.add_argument("--python", default="3.12", help="the GPU machine's Python (MAJOR.MINOR)")
    p.add_argument("--dali", action="store_true", help="also DALI, in parts under 60 MiB")
    args = p.parse_args(argv)
    try:  # its folders are emptied and rewritten: only in a bundle folder this command made
        out = owned.claim(args.out, "gpu-bundle", "--out",  # before markers: our wheel in core/
                          legacy=lambda folder: any((folder / "core").glob("densessl-*.whl")))
    except owned.NotOurs as err:
        raise SystemExit(f"error: {err}") from None
    core = build_core(out, args.python)
    print(f"{core}: {', '.join(sorted(f.name for f in core.iterdir()))} ({size(core) / 2**20:.1f} MiB)")
    if args.dali:
        parts = build_dali(out, args.python)
        print(f"{out / 'dali'}: {len(parts)} parts, {size(out / 'dali') / 2**20:.1f} MiB; send part N with "
              "`bash benchmarks/gpu.sh --receive-dali N` (carry .gpu-bundle/dali/part-NN)")


if __name__ == "__main__":
    main()
