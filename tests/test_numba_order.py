"""The Numba order hazard: the backends compile the engine's kernels (``geometry.draw_views``,
``resize.cut_views``) in one process, each with its own argument types (DALI's graph, FFCV's decoder, FFCV's own
decoders, which marked Numba's shared array types read-only before ``ffcv.use_private_state_types``). Every order
must work: DALI, then FFCV's stock decoder and ours, then DALI again, in a fresh process with a cold cache (the
rest of the suite runs them with a warm one)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("DENSESSL_REQUIRE_BACKENDS"):
    import ffcv  # noqa: F401  (`make test` installs both: a missing one is a failure, not a skip)
    import nvidia.dali  # noqa: F401
else:
    pytest.importorskip("nvidia.dali")
    pytest.importorskip("ffcv")

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_every_backend_order_works_with_a_cold_cache(synthetic_root, tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba_cache")}  # cold: nothing compiled yet
    for steps in (["dali", "stock", "ffcv", "dali"],):
        run = subprocess.run([sys.executable, str(HERE / "numba_order.py"), str(synthetic_root / "train"),
                              str(tmp_path), *steps],
                             env=env, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
        assert run.stdout.split() == [w for s in steps for w in (s, "ok")]
    assert any((tmp_path / "numba_cache").rglob("*.nbi"))
