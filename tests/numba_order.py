"""Run view-engine backends one after another in this process (the Numba order hazard): each step builds every
spec's loader on one backend and checks a batch against the contract. ``stock`` first runs FFCV's own decoder,
as a user's other FFCV pipeline would. Prints ``<step> ok`` per step; any failure exits non-zero.

    python tests/numba_order.py DATA_DIR WORK_DIR dali stock ffcv dali      # .betons are written into WORK_DIR
"""

import contextlib
import io
import sys
from pathlib import Path

from densessl.pipeline import MultiCropViews, PairSpec, build_loader, check_batch

SPECS = (PairSpec(size=64, num_matches=8, min_matches=64), MultiCropViews(crops="2x64,4x32", min_cells=16,
                                                                          num_matches=8).view_spec)


def betons(root: Path, tmp: Path) -> list[Path]:
    """A JPEG and a raw .beton of ``root`` (written once per process)."""
    from densessl.pipeline.ffcv import write_beton
    out = [tmp / f"{mode}.beton" for mode in ("jpg", "raw")]
    if not all(p.is_file() for p in out):
        with contextlib.redirect_stderr(io.StringIO()):  # FFCV's progress bar
            out = [write_beton(root, p, write_mode=p.stem) for p in out]
    return out


def stock(root: Path, tmp: Path) -> None:
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    from densessl.pipeline.ffcv import use_private_state_types
    use_private_state_types()  # as a user's own FFCV loader must, in a process that also runs DALI's operators
    for beton in betons(root, tmp):
        for _ in Loader(str(beton), batch_size=5, num_workers=1, order=OrderOption.SEQUENTIAL,
                        pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()],
                                   "index": [IntDecoder()]}):
            pass


def main() -> None:
    root, tmp, steps = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    for step in steps:
        if step == "stock":
            stock(root, tmp)
        else:
            sources = betons(root, tmp) if step == "ffcv" else [root]
            for data in sources:
                for spec in SPECS:
                    loader = build_loader(step, data, spec, batch_size=4, workers=2, order="sequential"
                                          if step == "ffcv" else "random")
                    check_batch(next(iter(loader)), spec)
        print(f"{step} ok", flush=True)


if __name__ == "__main__":
    main()
