"""The pair sampler's draws, frozen before the pair and multi-crop samplers become one engine (issue 38).

``frozen/pair_sampler.npz`` holds what ``geometry.view_pair_params`` returned at the commit that wrote it: both
windows (top, left, height, width), both flips, the draws needed (``tries``; 0: the shared-window fallback) and
the match seed, for 3000 seeds (the full uint64 range, edge values included) x 3 ``PairSpec``s x ``same_window``
off and on, on images from 16 to 900 px (landscape, portrait and square; log-uniform sides, 16x900 and 900x16
among them). The test draws every row again with the code of today and asserts exact equality: the pair sampler
is deleted, and ``draw`` below runs the view engine (``geometry.draw_views`` on ``PairSpec.view_spec``).

The file was written by this module's ``freeze`` (it refuses to run unless ``DENSESSL_FREEZE_SAMPLER=1``):

    DENSESSL_FREEZE_SAMPLER=1 .venv/bin/python tests/test_frozen_sampler.py
"""

import json
import os
import sys
from pathlib import Path

import numpy as np

from densessl.pipeline import PairSpec
from pair_rows import pair_row

FROZEN = Path(__file__).resolve().parent / "frozen" / "pair_sampler.npz"
SEEDS = 3000
# the trainer's default; small views with a hard overlap rule (many redraws and fallbacks); non-square views at
# stride 8 with few tries, a wide ratio and a biased flip
SPECS = ({}, {"size": 64, "num_matches": 8, "min_matches": 120},
         {"size": [96, 64], "scale": [0.08, 1.0], "ratio": [0.5, 2.0], "flip_p": 0.3, "stride": 8, "num_matches": 4,
          "min_matches": 16, "max_tries": 3})


def draw(spec: PairSpec, seed: int, height: int, width: int) -> np.ndarray:
    """The pair sampler's int64[12] for one ``height`` x ``width`` image, now drawn by the view engine."""
    return pair_row(spec, seed, height, width)


def inputs(n: int = SEEDS) -> dict[str, np.ndarray]:
    """The seeds and image sizes: a third each landscape, portrait and square, sides log-uniform in [16, 900]."""
    rng = np.random.default_rng(38)
    seeds = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    seeds[:5] = [0, 1, 2**63 - 1, 2**63, 2**64 - 1]
    sides = np.round(np.exp(rng.uniform(np.log(16), np.log(900), (n, 2)))).astype(np.int16)
    sides[:4] = [[16, 16], [900, 900], [16, 900], [900, 16]]
    short, long = sides.min(1), sides.max(1)
    shape = np.arange(n) % 3  # 0 landscape, 1 portrait, 2 square
    height = np.where(shape == 0, short, np.where(shape == 1, long, sides[:, 0]))
    width = np.where(shape == 0, long, np.where(shape == 1, short, sides[:, 0]))
    height[:4], width[:4] = sides[:4, 0], sides[:4, 1]
    return {"seed": seeds, "height": height.astype(np.int16), "width": width.astype(np.int16)}


def draws(specs: list[dict], seed, height, width) -> dict[str, np.ndarray]:
    """Every draw for every spec x same_window (off, on) x image, as compact arrays indexed [spec, same_window,
    image]: ``windows`` int16 [..., view, (top, left, height, width)], ``flips`` bool [..., view], ``tries`` int8,
    ``match_seed`` uint64."""
    rows = np.array([[[draw(PairSpec(**s, same_window=bool(same)), int(z), int(h), int(w))
                       for z, h, w in zip(seed, height, width)] for same in (0, 1)] for s in specs])
    return {"windows": rows[..., [0, 1, 2, 3, 5, 6, 7, 8]].reshape(*rows.shape[:3], 2, 4).astype(np.int16),
            "flips": rows[..., [4, 9]].astype(bool), "tries": rows[..., 10].astype(np.int8),
            "match_seed": rows[..., 11].view(np.uint64)}


def freeze(path: Path = FROZEN) -> None:
    """Write ``path`` from the sampler of today (how the frozen file was made)."""
    given = inputs()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, specs=np.array(json.dumps(SPECS)), **given, **draws(list(SPECS), **given))


def test_the_pair_sampler_draws_what_was_frozen():
    frozen = np.load(FROZEN)
    specs = json.loads(str(frozen["specs"]))
    seed, height, width = frozen["seed"], frozen["height"], frozen["width"]
    # what the file covers, so a regenerated file cannot quietly cover less
    assert len(seed) >= 3000 and height.min() == width.min() == 16 and height.max() == width.max() == 900
    assert (height > width).any() and (height < width).any() and (height == width).any()
    assert (frozen["tries"] == 0).any() and (frozen["tries"] > 1).any() and (frozen["tries"][:, 1] == 0).all()
    got = draws(specs, seed, height, width)
    differ = np.zeros(frozen["tries"].shape, bool)
    for key, value in got.items():
        differ |= (value != frozen[key]).reshape(*differ.shape, -1).any(-1)
    examples = [f"spec {s} same_window={bool(o)} seed={seed[i]} {height[i]}x{width[i]}: "
                f"{ {k: frozen[k][s, o, i].tolist() for k in got} } now { {k: got[k][s, o, i].tolist() for k in got} }"
                for s, o, i in np.argwhere(differ)[:5]]
    assert not differ.any(), f"{differ.sum()} of {differ.size} draws changed, e.g.\n" + "\n".join(examples)


if __name__ == "__main__":
    if os.environ.get("DENSESSL_FREEZE_SAMPLER") != "1":
        sys.exit("refusing to overwrite the frozen draws: set DENSESSL_FREEZE_SAMPLER=1 to write " + str(FROZEN))
    freeze()
    print(f"wrote {FROZEN} ({FROZEN.stat().st_size} bytes)")
