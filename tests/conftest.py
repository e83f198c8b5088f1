import numpy as np
import pytest
import torch
from hypothesis import settings
from PIL import Image

from densessl.pipeline.synthetic import SyntheticConfig, generate

# The first call of a Numba function compiles it (seconds on a fresh clone): no per-example deadline.
settings.register_profile("project", deadline=None)
settings.load_profile("project")

TINY = SyntheticConfig(height=96, width=128, train_per_class=6, val_per_class=2, videos=1, frames=3)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def index_dir(tmp_path_factory):
    """Data indexes (``pipeline.index``) go to the session's temporary folder, not the user's ~/.cache; child
    processes (torchrun, Slurm jobs) inherit it."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("index")
        patch.setenv("DENSESSL_INDEX_DIR", str(folder))
        yield folder


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synthetic"), TINY, progress=False)


def ramp_image(height: int, width: int) -> np.ndarray:
    """Pixels that name their own position: R encodes x, G encodes y (continuous coords, centres at +0.5)."""
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    rgb = np.stack([xs / width, ys / height, np.full_like(xs, 0.5)], -1)
    return np.round(rgb * 255).astype(np.uint8)


@pytest.fixture(scope="session")
def ramp_root(tmp_path_factory):
    """An ImageFolder of coordinate-ramp JPEGs in landscape, portrait and square shapes."""
    root = tmp_path_factory.mktemp("ramps")
    (root / "ramps").mkdir()
    for i, (h, w) in enumerate([(192, 256), (256, 160), (200, 200), (150, 250)] * 4):
        Image.fromarray(ramp_image(h, w)).save(root / "ramps" / f"{i:03d}.jpg", quality=95, subsampling=0)
    return root
