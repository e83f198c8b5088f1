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
        assert 1.5 - 1e-3 <= depth.min() and depth.max() <= 8.0 + 1e-3  # the floor's near edge, the back wall
        assert (depth[classes > 0] <= 5.0 + 1e-3).all()  # shapes stand on the floor in front of the wall


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


def _spearman(a, b) -> float:
    ranks = [np.argsort(np.argsort(np.asarray(x, np.float64))) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def test_depth_shows_in_the_pixels_through_perspective():
    """Over the default validation scenes: within each class, a shape's visible area falls with its depth
    (perspective, then occlusion), and its base touches the floor at the row where the floor is as deep."""
    from densessl.pipeline.synthetic import Camera, SyntheticConfig, render, scene
    cfg = SyntheticConfig()
    camera = Camera(cfg.height)
    nothing = (np.zeros((cfg.height, cfg.width, 3), np.float32), np.full((cfg.height, cfg.width), 99, np.float32))
    areas, depths, gaps = {}, {}, []
    for cls in range(len(CLASSES)):
        for i in range(cfg.val_per_class):
            (_, _, instances, depth, shapes), _ = scene(cfg, "val", cls, i)
            for k, shape in enumerate(shapes):
                visible = instances == k + 1
                if visible.any():
                    areas.setdefault(shape.cls, []).append(int(visible.sum()))
                    depths.setdefault(shape.cls, []).append(shape.depth)
                    assert np.allclose(depth[visible], shape.depth)
                alone = render(nothing, [shape])[2] > 0  # the whole shape, unoccluded
                base = np.nonzero(alone.any(1))[0].max() + 0.5  # its lowest row's centre
                gaps.append(abs(float(camera.depth_at_row(base)) - shape.depth) / shape.depth)
    for cls, name in enumerate(CLASSES):
        assert len(areas[cls]) >= 20 and _spearman(areas[cls], depths[cls]) < -0.6, name
    assert max(gaps) < 0.05


def test_camera_floor_and_wall():
    from densessl.pipeline.synthetic import Camera
    camera = Camera(144)
    rows = np.arange(144) + 0.5
    depth = camera.depth_at_row(rows)
    assert abs(depth[-1] - Camera.NEAR) < 0.05 and (depth[:20] == Camera.FAR).all()
    assert (np.diff(depth) <= 0).all()  # nearer down the image
    floor = depth < Camera.FAR
    np.testing.assert_allclose(camera.floor_row(depth[floor]), rows[floor], rtol=1e-4)


def test_haze_is_off_by_default_and_pales_the_far_wall(tmp_path):
    from densessl.pipeline.synthetic import SyntheticConfig, scene
    clear, hazy = SyntheticConfig(height=48, width=64), SyntheticConfig(height=48, width=64, haze=0.3)
    (a, _, _, depth, _), _ = scene(clear, "train", 0, 0)
    (b, _, _, _, _), _ = scene(hazy, "train", 0, 0)
    far, near = depth >= 8.0, depth <= 2.0
    grey = np.array([200, 205, 215], np.float32)
    gap = lambda image, where: np.abs(image[where].astype(np.float32) - grey).mean()  # noqa: E731
    assert gap(b, far) < 0.3 * gap(a, far)  # the wall at 8 m is mostly haze
    assert gap(b, near) > 0.8 * gap(a, near)  # the nearest floor keeps its colours
