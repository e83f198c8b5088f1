import json

import numpy as np
from PIL import Image

from densessl.pipeline import scan_image_folder
from densessl.pipeline.synthetic import CLASSES, generate, main

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
    from densessl.pipeline.synthetic import SyntheticConfig
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


def test_class_is_the_outline_not_the_appearance():
    """Every class is drawn in every texture family and over the whole hue circle: no local colour or texture
    names a class."""
    import colorsys

    from densessl.pipeline.synthetic import TEXTURES, SyntheticConfig, _random_shape
    rng = np.random.default_rng(0)
    cfg = SyntheticConfig()
    for cls in range(len(CLASSES)):
        shapes = [_random_shape(rng, cfg, cls) for _ in range(200)]
        assert {s.texture for s in shapes} == set(range(len(TEXTURES)))
        hues = np.array([colorsys.rgb_to_hsv(*(s.colours[0] / 255))[0] for s in shapes])
        assert np.histogram(hues, bins=4, range=(0, 1))[0].min() > 25, CLASSES[cls]


def test_validation_scenes_and_clip_frames_are_lit_differently(tmp_path):
    """The same scenes without the lighting change differ from the written ones in validation only; clips
    zoom in, so the first and last masks differ in object size."""
    from densessl.pipeline.synthetic import SyntheticConfig
    small = dict(height=48, width=64, train_per_class=1, val_per_class=2, videos=1, frames=3)
    lit = generate(tmp_path / "lit", SyntheticConfig(**small), progress=False)
    plain = generate(tmp_path / "plain", SyntheticConfig(**small, val_lighting=0, video_lighting=0, video_zoom=1),
                     progress=False)
    for split, differs in (("train", False), ("val", True)):
        for a in sorted((lit / split).glob("*/*.jpg")):
            b = plain / a.relative_to(lit)
            pixels = np.abs(np.asarray(Image.open(a), np.int16) - np.asarray(Image.open(b), np.int16)).mean()
            assert (pixels > 5) == differs, (a, pixels)
    masks = sorted((lit / "videos" / "Annotations").glob("*/*.png"))
    plain_masks = sorted((plain / "videos" / "Annotations").glob("*/*.png"))
    assert (np.asarray(Image.open(masks[-1])) > 0).sum() > (np.asarray(Image.open(plain_masks[-1])) > 0).sum()
