"""The embedded data set: procedural scenes with dense ground truth, generated deterministically in seconds.

Each scene is a room seen by a pinhole camera: a floor (a ground plane whose depth is fixed by the row) meeting a
back wall, with a few textured flat shapes standing upright on the floor. Perspective holds throughout
(``Camera``): a shape's image size and texture period scale with 1/depth for its class's physical size, its base
touches the floor at the row where the floor is as deep as it is, the floor's own texture recedes with depth,
and nearer shapes hide farther ones; so depth is something the pixels show. A shape's class is its outline only:
every instance draws its hue and texture family at random, so no local colour or texture names a class, and a
probe must read shape, which is what dense pretraining has to learn. The tasks also ask for invariance:
validation scenes are lit differently from training scenes (colour cast, brightness, gamma), and in each clip
every frame after the first is lit differently while the camera zooms in. Written to disk as::

    ROOT/{train,val}/<class>/<stem>.jpg          ImageFolder layout (class = largest visible shape)
    ROOT/labels/{train,val}/<class>/<stem>.png   per-pixel class id (0 = background, i+1 = CLASSES[i])
    ROOT/labels/{train,val}/<class>/<stem>_depth.png   per-pixel depth, uint16 millimetres
    ROOT/videos/JPEGImages/<video>/<frame>.jpg   short clips of shapes sliding on the floor (DAVIS layout)
    ROOT/videos/Annotations/<video>/<frame>.png  palette PNG instance masks (0 = background)
    ROOT/meta.json                               classes, sizes and the seed; ROOT/.complete marks a full write

Run ``python -m densessl.pipeline.synthetic --out DIR``.
"""

from __future__ import annotations

import argparse
import colorsys
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from . import owned
from .progress import progress as show_progress

CLASSES = ("disc", "square", "triangle", "ring")
TEXTURES = ("stripes", "checker", "dots", "waves")  # drawn per instance, whatever its class
KIND = "synthetic-set"  # its ``owned`` marker
def _legacy(folder: Path) -> bool:
    """A set this writer made before folders carried markers: its meta.json, with the classes and config."""
    return owned.json_keys(folder / "meta.json", "classes", "config")
# raised whenever the same config renders other pixels, so a stale set on disk is rewritten; 3: perspective
VERSION = 3
DAVIS_PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128, 128, 0, 128, 0, 128, 128] + [255] * (3 * 249)


@dataclass(frozen=True)
class SyntheticConfig:
    height: int = 144
    width: int = 192
    train_per_class: int = 64
    val_per_class: int = 16
    videos: int = 4
    frames: int = 12
    max_shapes: int = 4
    jpeg_quality: int = 90
    grain: float = 0.0  # std (grey levels) of per-pixel noise on scene images: JPEGs as costly as photos
    val_lighting: float = 1.0  # strength of the lighting change of validation scenes (0: lit as training)
    video_lighting: float = 1.0  # strength of each frame's own lighting change (0: constant)
    video_zoom: float = 1.4  # a clip's last frame is zoomed in this much about the centre (1: no zoom)
    haze: float = 0.0  # aerial perspective: contrast lost per metre beyond the nearest floor (0: none)
    seed: int = 0


@dataclass(frozen=True)
class Camera:
    """The pinhole camera every scene of one image size is seen by, level, at ``height_m`` above the floor, with
    its principal point at the image centre and a focal length of the image height in pixels. The horizon lies
    ``horizon`` of the way down the image; the floor runs from ``NEAR`` metres at the bottom row to the back wall
    at ``FAR`` metres. A floor point at depth Z is seen at row ``horizon_row + focal * height_m / Z``."""

    height: int  # the image's, in pixels
    NEAR = 1.5  # metres, the floor at the bottom row
    FAR = 8.0  # metres, the back wall
    horizon = 0.2

    @property
    def focal(self) -> float:
        return float(self.height)

    @property
    def horizon_row(self) -> float:
        return self.horizon * self.height

    @property
    def height_m(self) -> float:  # so that the bottom row sees the floor at NEAR
        return self.NEAR * (self.height - self.horizon_row) / self.focal

    def floor_row(self, depth):
        """The row (pixel coordinates, y down) where the floor is ``depth`` metres away."""
        return self.horizon_row + self.focal * self.height_m / np.asarray(depth)

    def depth_at_row(self, y):
        """The background's depth at row coordinate ``y``: the floor's, or the back wall's above where they meet."""
        below = np.maximum(np.asarray(y, np.float32) - self.horizon_row, 1e-6)
        return np.minimum(self.focal * self.height_m / below, self.FAR).astype(np.float32)

    def pixels(self, size_m, depth):
        """Image length in pixels of ``size_m`` metres, upright at ``depth`` metres."""
        return self.focal * size_m / depth


# each class's physical size (the radius of its outline, metres): a shape's image size is this over its depth
CLASS_SIZE_M = {"disc": 0.48, "square": 0.5, "triangle": 0.56, "ring": 0.52}
SHAPE_DEPTH_M = (1.7, 5.0)  # where shapes stand: at any depth in it a shape's top stays inside the frame
PERIOD_M = (0.1, 0.18)  # physical texture period


@dataclass
class Shape:
    cls: int
    texture: int  # index into TEXTURES
    cx: float
    cy: float
    radius: float
    angle: float
    depth: float  # metres
    colours: tuple[np.ndarray, np.ndarray]
    period: float
    velocity: tuple[float, float] = (0.0, 0.0)


def _hsv(h, s, v) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), np.float32) * 255


def _texture(kind: str, x: np.ndarray, y: np.ndarray, period: float) -> np.ndarray:
    """A binary-ish pattern in [0, 1] over object-centred coordinates."""
    if kind == "stripes":
        return (np.sin(2 * np.pi * x / period) > 0).astype(np.float32)
    if kind == "checker":
        return ((np.floor(x / period) + np.floor(y / period)) % 2).astype(np.float32)
    if kind == "dots":
        u, v = np.mod(x, period) - period / 2, np.mod(y, period) - period / 2
        return (u * u + v * v < (0.3 * period) ** 2).astype(np.float32)
    if kind == "waves":
        return (np.sin(2 * np.pi * (y + 0.3 * period * np.sin(2 * np.pi * x / (2 * period))) / period) > 0
                ).astype(np.float32)
    raise ValueError(kind)


def _shape_mask(cls: int, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Mask of shape ``cls`` over rotated, object-centred coordinates."""
    name = CLASSES[cls]
    d2 = x * x + y * y
    if name == "disc":
        return d2 < r * r
    if name == "square":
        return (np.abs(x) < 0.8 * r) & (np.abs(y) < 0.8 * r)
    if name == "triangle":  # equilateral, pointing up, inscribed in radius r
        return (y < 0.5 * r) & (np.sqrt(3) * x - y < r) & (-np.sqrt(3) * x - y < r)
    if name == "ring":
        return (d2 < r * r) & (d2 > (0.55 * r) ** 2)
    raise ValueError(cls)


def _lowest_extent(cls: int, radius: float, angle: float) -> float:
    """How far below its centre (image y down) a shape of ``radius`` reaches once turned by ``angle``."""
    ca, sa = np.cos(angle), np.sin(angle)
    name = CLASSES[cls]
    if name in ("disc", "ring"):
        return radius
    if name == "square":
        corners = [(u, v) for u in (-0.8, 0.8) for v in (-0.8, 0.8)]
    else:  # triangle: the vertices of ``_shape_mask``'s outline
        corners = [(0.0, -1.0), (np.sqrt(3) / 2, 0.5), (-np.sqrt(3) / 2, 0.5)]
    return max(radius * (sa * u + ca * v) for u, v in corners)  # dy of the outline's points (render's inverse)


def _random_shape(rng: np.random.Generator, cfg: SyntheticConfig, cls: int | None = None,
                  moving: bool = False) -> Shape:
    """A shape standing on the floor at a random depth: its size, texture period and base row follow from the
    depth (``Camera``); ``moving`` shapes slide sideways along the floor, keeping their depth."""
    cls = int(rng.integers(len(CLASSES))) if cls is None else cls
    h = rng.random()  # appearance is the instance's, not the class's
    light = _hsv(h, rng.uniform(0.5, 0.9), rng.uniform(0.75, 1.0))
    dark = _hsv(h + rng.uniform(-0.04, 0.04), rng.uniform(0.6, 1.0), rng.uniform(0.2, 0.45))
    camera = Camera(cfg.height)
    depth = rng.uniform(*SHAPE_DEPTH_M)
    radius = camera.pixels(CLASS_SIZE_M[CLASSES[cls]] * rng.uniform(0.92, 1.08), depth)
    angle = rng.uniform(0, 2 * np.pi)
    cy = float(camera.floor_row(depth)) - _lowest_extent(cls, radius, angle)  # its base on the floor
    return Shape(cls, int(rng.integers(len(TEXTURES))), rng.uniform(0.12, 0.88) * cfg.width, cy, radius, angle,
                 depth, (light, dark), camera.pixels(rng.uniform(*PERIOD_M), depth),
                 (rng.uniform(-2.5, 2.5) * cfg.height / 144, 0.0) if moving else (0.0, 0.0))


def _smooth_noise(rng: np.random.Generator, cells: tuple[int, int], u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Value noise in [0, 1]: a random grid of ``cells`` (rows, columns) read bilinearly at ``u``, ``v`` in [0, 1]
    (clipped), smoothstepped so its cells do not show."""
    grid = rng.random(cells).astype(np.float32)
    gy, gx = np.clip(v, 0, 1) * (cells[0] - 1), np.clip(u, 0, 1) * (cells[1] - 1)
    y0, x0 = np.minimum(gy.astype(int), cells[0] - 2), np.minimum(gx.astype(int), cells[1] - 2)
    fy, fx = gy - y0, gx - x0
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)
    top = grid[y0, x0] * (1 - fx) + grid[y0, x0 + 1] * fx
    bottom = grid[y0 + 1, x0] * (1 - fx) + grid[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _background(rng: np.random.Generator, cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    """The room: a back wall and a floor, each in its own two-colour value noise laid on its own surface (the
    floor's in metres on the ground, so it shrinks towards the wall), and their depth (``Camera.depth_at_row``)."""
    camera = Camera(cfg.height)
    ys, xs = np.mgrid[0:cfg.height, 0:cfg.width].astype(np.float32) + 0.5
    depth = np.broadcast_to(camera.depth_at_row(ys[:, :1]), (cfg.height, cfg.width)).copy()
    half_width = camera.FAR * cfg.width / 2 / camera.focal  # the floor's extent where it meets the wall
    ground_x = (xs - cfg.width / 2) * depth / camera.focal  # metres, left-right on the floor
    floor = _smooth_noise(rng, (7, 9), (ground_x + half_width) / (2 * half_width),
                          (depth - camera.NEAR) / (camera.FAR - camera.NEAR))
    wall = _smooth_noise(rng, (4, 5), xs / cfg.width, ys / cfg.height)
    on_floor = (depth < camera.FAR)[..., None]
    colours = [_hsv(rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.35, 0.8)) for _ in range(4)]
    image = np.where(on_floor, colours[0] * floor[..., None] + colours[1] * (1 - floor[..., None]),
                     colours[2] * wall[..., None] + colours[3] * (1 - wall[..., None]))
    return image.astype(np.float32), depth


def _hazy(image: np.ndarray, depth: np.ndarray, haze: float) -> np.ndarray:
    """Aerial perspective: each pixel blended towards a pale sky grey by ``1 - exp(-haze * (depth - NEAR))``."""
    if haze <= 0:
        return image
    mix = (1 - np.exp(-haze * np.maximum(depth - Camera.NEAR, 0)))[..., None]
    return image * (1 - mix) + np.array([200, 205, 215], np.float32) * mix


def render(background: tuple[np.ndarray, np.ndarray], shapes: list[Shape], t: float = 0.0, zoom: float = 1.0,
           haze: float = 0.0):
    """Paint shapes far-to-near at time ``t`` through a camera zoomed ``zoom`` times about the image centre (a
    longer focal length), with aerial perspective ``haze`` (``_hazy``); returns (RGB uint8, class ids,
    instance ids, depth metres)."""
    image, depth = background[0].copy(), background[1].copy()
    h, w = depth.shape
    classes = np.zeros((h, w), np.uint8)
    instances = np.zeros((h, w), np.uint8)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    if zoom != 1.0:  # scene coordinates seen by each pixel; the background is resampled the same way
        xs, ys = w / 2 + (xs - w / 2) / zoom, h / 2 + (ys - h / 2) / zoom
        image = np.stack([np.asarray(Image.fromarray(image[..., c], mode="F").transform(
            (w, h), Image.AFFINE, (1 / zoom, 0, w / 2 * (1 - 1 / zoom), 0, 1 / zoom, h / 2 * (1 - 1 / zoom)),
            Image.BILINEAR)) for c in range(3)], -1)
    order = sorted(range(len(shapes)), key=lambda i: -shapes[i].depth)
    for i in order:
        s = shapes[i]
        dx, dy = xs - (s.cx + t * s.velocity[0]), ys - (s.cy + t * s.velocity[1])
        ca, sa = np.cos(s.angle), np.sin(s.angle)
        u, v = ca * dx + sa * dy, -sa * dx + ca * dy
        mask = _shape_mask(s.cls, u, v, s.radius)
        pattern = _texture(TEXTURES[s.texture], u, v, s.period)[..., None]
        paint = s.colours[0] * pattern + s.colours[1] * (1 - pattern)
        image[mask] = paint[mask]
        classes[mask] = s.cls + 1
        instances[mask] = i + 1
        depth[mask] = s.depth
    image = _hazy(image, depth, haze)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), classes, instances, depth


@dataclass(frozen=True)
class Lighting:
    """A global photometric condition: per-channel gain (colour cast times brightness), then gamma."""

    gain: tuple[float, float, float] = (1.0, 1.0, 1.0)
    gamma: float = 1.0

    @staticmethod
    def draw(rng: np.random.Generator, strength: float) -> "Lighting":
        brightness = 1 + strength * rng.uniform(-0.45, 0.3)
        cast = 1 + strength * rng.uniform(-0.3, 0.3, 3)
        return Lighting(tuple(float(g) for g in brightness * cast), float(1 + strength * rng.uniform(-0.3, 0.5)))

    def apply(self, image: np.ndarray) -> np.ndarray:
        x = np.clip(image.astype(np.float32) / 255 * np.asarray(self.gain, np.float32), 0, 1) ** self.gamma
        return np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8)


def _grainy(image: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Sensor-like noise: smooth procedural scenes compress far better and decode faster than natural photos;
    grain brings a JPEG's size and decode cost nearer to ImageNet's (sizes and rates: benchmarks/RESULTS.md)."""
    if sigma <= 0:
        return image
    noisy = image.astype(np.float32) + rng.normal(0.0, sigma, image.shape).astype(np.float32)
    return np.clip(noisy + 0.5, 0, 255).astype(np.uint8)


def _save_scene(root: Path, split: str, stem: str, cls: int, drawn, quality: int) -> None:
    image, classes, _, depth = drawn
    name = CLASSES[cls]
    (root / split / name).mkdir(parents=True, exist_ok=True)
    (root / "labels" / split / name).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / split / name / f"{stem}.jpg", quality=quality)
    Image.fromarray(classes).save(root / "labels" / split / name / f"{stem}.png")
    Image.fromarray(np.round(depth * 1000).astype(np.uint16)).save(root / "labels" / split / name / f"{stem}_depth.png")


def scene(cfg: SyntheticConfig, split: str, cls: int, index: int):
    """Scene ``index`` of class ``cls`` in ``split`` ('train' or 'val'), as ``generate`` writes it before
    lighting and grain: (RGB uint8, class ids, instance ids, depth metres, its shapes; instance i+1 is shapes[i]),
    and the generator it was drawn from, to draw the rest of that image from. Its largest visible shape has class
    ``cls``, so the ImageFolder label is meaningful."""
    rng = np.random.default_rng([cfg.seed, {"train": 0, "val": 1}[split], cls, index])
    while True:
        shapes = [_random_shape(rng, cfg, cls)] + [_random_shape(rng, cfg) for _ in
                                                    range(int(rng.integers(0, cfg.max_shapes)))]
        drawn = render(_background(rng, cfg), shapes, haze=cfg.haze)
        areas = np.bincount(drawn[1].ravel(), minlength=len(CLASSES) + 1)[1:]
        if areas.argmax() == cls:
            return (*drawn, shapes), rng


def generate(out: str | Path, cfg: SyntheticConfig = SyntheticConfig(), progress: bool = True,
             option: str = "--out") -> Path:
    """Write the data set under ``out`` and return it. A complete set of the same config and version is reused;
    an incomplete or other one is replaced, but only when the folder is one this writer made (``owned``): any
    other existing, non-empty folder raises ``owned.NotOurs`` and is left as it is."""
    root = owned.claim(out, KIND, option, legacy=_legacy)
    if (root / ".complete").exists():
        meta = json.loads((root / "meta.json").read_text())
        if meta["config"] == asdict(cfg) and meta.get("version") == VERSION:
            return root
    owned.replace(root, KIND, option)
    jobs = [(split, cls, i) for split, n in (("train", cfg.train_per_class), ("val", cfg.val_per_class))
            for cls in range(len(CLASSES)) for i in range(n)]
    for split, cls, i in show_progress(jobs, "synthetic scenes", unit="img", enabled=progress):
        (image, *truth, _), rng = scene(cfg, split, cls, i)
        if split == "val" and cfg.val_lighting:
            image = Lighting.draw(rng, cfg.val_lighting).apply(image)
        _save_scene(root, split, f"{CLASSES[cls]}_{i:05d}", cls, (_grainy(image, rng, cfg.grain), *truth),
                    cfg.jpeg_quality)
    for v in show_progress(range(cfg.videos), "synthetic videos", unit="clip", enabled=progress):
        rng = np.random.default_rng([cfg.seed, 2, v])
        background = _background(rng, cfg)
        shapes = [_random_shape(rng, cfg, moving=True) for _ in range(int(rng.integers(2, cfg.max_shapes + 1)))]
        frames_dir = root / "videos" / "JPEGImages" / f"clip{v:03d}"
        masks_dir = root / "videos" / "Annotations" / f"clip{v:03d}"
        frames_dir.mkdir(parents=True)
        masks_dir.mkdir(parents=True)
        for f in range(cfg.frames):
            a = f / max(1, cfg.frames - 1)
            image, _, instances, _ = render(background, shapes, t=float(f), zoom=1 + a * (cfg.video_zoom - 1),
                                            haze=cfg.haze)
            if f and cfg.video_lighting:  # every later frame under its own lighting: no gradual drift to follow
                image = Lighting.draw(rng, cfg.video_lighting).apply(image)
            Image.fromarray(image).save(frames_dir / f"{f:05d}.jpg", quality=cfg.jpeg_quality)
            mask = Image.fromarray(instances, mode="P")
            mask.putpalette(DAVIS_PALETTE)
            mask.save(masks_dir / f"{f:05d}.png")
    (root / "meta.json").write_text(json.dumps({"classes": ["background", *CLASSES], "config": asdict(cfg), "version": VERSION},
                                             indent=1))
    (root / ".complete").touch()
    return root


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the folder the set is written to: new, empty, or one this "
                                                "command wrote before")
    for field, value in asdict(SyntheticConfig()).items():
        p.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    args = vars(p.parse_args(argv))
    try:
        root = generate(args.pop("out"), SyntheticConfig(**args))
    except owned.NotOurs as err:
        raise SystemExit(f"error: {err}") from None
    n = sum(1 for _ in root.glob("train/*/*.jpg"))
    print(f"synthetic data set: {root} ({n} train images, classes {', '.join(CLASSES)})")


if __name__ == "__main__":
    main()
