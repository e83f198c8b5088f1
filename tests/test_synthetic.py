import json

import numpy as np
from PIL import Image

from pipeline import scan_image_folder
from pipeline.synthetic import CLASSES, generate, main

from conftest import TINY


def test_layout_and_labels(synthetic_root):
    folder = scan_image_folder(synthetic_root / "train")
    assert folder.classes == tuple(sorted(CLASSES))
    assert len(folder) == TINY.train_per_class * len(CLASSES)
    meta = json.loads((synthetic_root / "meta.json").read_text())
    assert meta["classes"][1:] == list(CLASSES)
    for path, label in zip(folder.files[::5], folder.labels[::5]):
        stem = path.replace("/train/", "/labels/train/")[: -len(".jpg")]
        classes = np.asarray(Image.open(stem + ".png"))
        depth = np.asarray(Image.open(stem + "_depth.png")).astype(np.float32) / 1000
        image = Image.open(path)
        assert classes.shape == depth.shape == (image.height, image.width) == (TINY.height, TINY.width)
        # the folder names the largest visible shape
        areas = np.bincount(classes.ravel(), minlength=len(CLASSES) + 1)[1:]
        assert CLASSES[areas.argmax()] == folder.classes[label]
        assert 1.0 <= depth.min() and depth.max() <= 6.0
        # shapes stand in front of the ground plane behind them
        assert (depth[classes > 0] <= 4.0 + 1e-3).all()


def test_videos_have_masks_per_frame(synthetic_root):
    frames = sorted((synthetic_root / "videos" / "JPEGImages").glob("*/*.jpg"))
    masks = sorted((synthetic_root / "videos" / "Annotations").glob("*/*.png"))
    assert len(frames) == len(masks) == TINY.videos * TINY.frames
    first, last = (np.asarray(Image.open(m)) for m in (masks[0], masks[-1]))
    assert Image.open(masks[0]).mode == "P" and first.max() >= 1
    assert not np.array_equal(first, last), "shapes should move between frames"


def test_generation_is_deterministic(tmp_path, synthetic_root):
    again = generate(tmp_path / "again", TINY, progress=False)
    for rel in ("train/disc", "labels/val/ring", "videos/Annotations/clip000"):
        a, b = sorted((synthetic_root / rel).iterdir()), sorted((again / rel).iterdir())
        assert [p.name for p in a] == [p.name for p in b]
        assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))


def test_cli_writes_a_set(tmp_path, capsys):
    main(["--out", str(tmp_path / "cli"), "--train-per-class", "1", "--val-per-class", "1", "--videos", "0",
          "--height", "40", "--width", "48"])
    assert "4 train images" in capsys.readouterr().out
    assert (tmp_path / "cli" / ".complete").exists()


def test_grain_adds_noise_to_images_only(tmp_path):
    """Grain (for benchmarks: JPEGs nearer photos in size and decode cost) leaves the scene and its labels alone,
    and is drawn from the scene's seed: the same bytes each time."""
    small = {"train_per_class": 2, "val_per_class": 0, "videos": 0, "height": 96, "width": 128}
    from pipeline.synthetic import SyntheticConfig
    clean = generate(tmp_path / "clean", SyntheticConfig(**small), progress=False)
    grainy = generate(tmp_path / "grainy", SyntheticConfig(**small, grain=12.0), progress=False)
    again = generate(tmp_path / "again", SyntheticConfig(**small, grain=12.0), progress=False)
    for path in sorted(clean.glob("train/*/*.jpg")):
        rel = path.relative_to(clean)
        a, b = (np.asarray(Image.open(r / rel)).astype(np.float32) for r in (clean, grainy))
        assert (grainy / rel).stat().st_size > 1.2 * path.stat().st_size
        assert 6 < np.std(b - a) < 18 and abs(np.mean(b - a)) < 2
        assert (grainy / rel).read_bytes() == (again / rel).read_bytes()
        label = rel.with_suffix(".png").as_posix().replace("train/", "labels/train/", 1)
        assert (clean / label).read_bytes() == (grainy / label).read_bytes()
