"""Readers for the downstream data layouts: PASCAL VOC 2012, Cityscapes, NYU-depth v2, DAVIS-2017, and the
embedded synthetic set. Each returns file lists and knows how to read its targets; errors say what is missing.

    VOC:        ROOT/JPEGImages/*.jpg, SegmentationClass/*.png, ImageSets/Segmentation/{train,val}.txt
                (train_aug: SegmentationClassAug/*.png + ImageSets/Segmentation/train_aug.txt, used when present)
    Cityscapes: ROOT/leftImg8bit/{split}/<city>/<id>_leftImg8bit.png, gtFine/{split}/<city>/<id>_gtFine_labelIds.png
    NYU v2:     ROOT/{train,test}/rgb/<id>.{jpg,png} and ROOT/{train,test}/depth/<id>.png (uint16 millimetres, 0 =
                no measurement), the layout of the usual 795/654 labelled-split exports; or the official files
                as downloaded, ROOT/nyu_depth_v2_labeled.mat (MATLAB v7.3 = HDF5) and ROOT/splits.mat (the
                standard 795/654 split), extracted once into that layout under ROOT/extracted
    DAVIS-2017: ROOT/JPEGImages/480p/<video>/*.jpg, Annotations/480p/<video>/*.png, ImageSets/2017/{train,val}.txt
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from densessl.pipeline.folder import FORMATS
from densessl.pipeline.synthetic import CLASSES as SYNTHETIC_CLASSES

from .metrics import IGNORE


# Cityscapes labelIds -> the 19 train ids (all others ignored), from the official label table.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
_CITYSCAPES_LUT = np.full(256, IGNORE, np.uint8)
for _label, _train in CITYSCAPES_TRAIN_IDS.items():
    _CITYSCAPES_LUT[_label] = _train


@dataclass
class DenseSet:
    """Images with a dense target each: class ids (``task='segmentation'``) or metres (``task='depth'``)."""

    images: list[Path]
    targets: list[Path]
    task: str
    num_classes: int = 0
    name: str = ""
    label_map: np.ndarray | None = field(default=None, repr=False)  # raw label value -> class id
    depth_range: tuple[float, float] = (1e-3, 10.0)  # depth: metres that count (exclusive); predictions clamped
    eigen_crop: bool = False  # depth: score inside the Eigen crop only (NYU)

    def __post_init__(self):
        if not self.images:
            raise FileNotFoundError(f"{self.name}: no images found")
        missing = [t for t in self.targets if not t.is_file()]
        if missing:
            raise FileNotFoundError(f"{self.name}: {len(missing)} target files missing, e.g. {missing[0]}")

    def __len__(self) -> int:
        return len(self.images)

    def read_target(self, i: int) -> np.ndarray:
        with Image.open(self.targets[i], formats=FORMATS) as im:
            raw = np.asarray(im)
        if self.task == "depth":
            return raw.astype(np.float32) / 1000  # millimetres -> metres; 0 stays 0 (invalid)
        return self.label_map[raw] if self.label_map is not None else raw.astype(np.uint8)


@dataclass
class Video:
    name: str
    frames: list[Path]
    masks: list[Path]  # the first is the given mask; the rest are ground truth (when present)


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: expected the {what} layout (see evaluation/datasets.py)")
    return path


def voc(root: str | Path, split: str = "val") -> DenseSet:
    root = Path(root)
    sets = _require(root / "ImageSets" / "Segmentation", "PASCAL VOC 2012")
    labels = root / "SegmentationClass"
    if split == "train" and (sets / "train_aug.txt").exists() and (root / "SegmentationClassAug").is_dir():
        split, labels = "train_aug", root / "SegmentationClassAug"
    ids = _require(sets / f"{split}.txt", "PASCAL VOC 2012").read_text().split()
    return DenseSet([root / "JPEGImages" / f"{i}.jpg" for i in ids], [labels / f"{i}.png" for i in ids],
                    "segmentation", 21, f"VOC2012 {split}")


def cityscapes(root: str | Path, split: str = "val") -> DenseSet:
    root = Path(root)
    images = sorted(_require(root / "leftImg8bit" / split, "Cityscapes").glob("*/*_leftImg8bit.png"))
    targets = [root / "gtFine" / split / p.parent.name / p.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
               for p in images]
    return DenseSet(images, targets, "segmentation", 19, f"Cityscapes {split}", label_map=_CITYSCAPES_LUT)


NYU_MAT, NYU_SPLITS = "nyu_depth_v2_labeled.mat", "splits.mat"


def nyu_depth(root: str | Path, split: str = "test") -> DenseSet:
    """NYU-depth v2 in the folder layout, or from the official .mat files (extracted on first use)."""
    root = Path(root)
    if (root / NYU_MAT).is_file():
        root = extract_nyu_mat(root)
    rgb = _require(root / split / "rgb", "NYU-depth v2")
    images = sorted(p for p in rgb.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    return DenseSet(images, [root / split / "depth" / f"{p.stem}.png" for p in images], "depth",
                    name=f"NYU-depth v2 {split}", eigen_crop=True)


def extract_nyu_mat(root: Path) -> Path:
    """Write the labelled set of ``ROOT/nyu_depth_v2_labeled.mat`` into ``ROOT/extracted/{train,test}`` (PNG RGB
    and uint16-millimetre depth) by the indices of ``ROOT/splits.mat`` (1-based, as MATLAB writes them); once."""
    import h5py
    from scipy.io import loadmat

    out = root / "extracted"
    if (out / ".complete").is_file():
        return out
    splits = loadmat(str(_require(root / NYU_SPLITS, "NYU-depth v2 splits.mat")))
    with h5py.File(root / NYU_MAT, "r") as f:
        images, depths = f["images"], f["depths"]  # MATLAB's column-major arrays: [N,3,W,H] and [N,W,H]
        for split, key in (("train", "trainNdxs"), ("test", "testNdxs")):
            for folder in ("rgb", "depth"):
                (out / split / folder).mkdir(parents=True, exist_ok=True)
            for index in np.asarray(splits[key]).reshape(-1).astype(int):
                i = index - 1
                Image.fromarray(np.ascontiguousarray(images[i].transpose(2, 1, 0))).save(
                    out / split / "rgb" / f"{index:04d}.png")
                millimetres = np.round(np.asarray(depths[i]).T * 1000).clip(0, 65535).astype(np.uint16)
                Image.fromarray(millimetres).save(out / split / "depth" / f"{index:04d}.png")
    (out / ".complete").touch()
    return out


def synthetic(root: str | Path, split: str, task: str = "segmentation") -> DenseSet:
    """The embedded set's labelled scenes (``python -m densessl.pipeline.synthetic``): background + its classes, or depth."""
    root = Path(root)
    images = sorted((root / split).glob("*/*.jpg"))
    suffix = "_depth.png" if task == "depth" else ".png"
    targets = [root / "labels" / split / p.parent.name / f"{p.stem}{suffix}" for p in images]
    return DenseSet(images, targets, task, len(SYNTHETIC_CLASSES) + 1 if task == "segmentation" else 0,
                    f"synthetic {split} {task}")


def davis(root: str | Path, split: str = "val", resolution: str = "480p") -> list[Video]:
    root = Path(root)
    names = _require(root / "ImageSets" / "2017" / f"{split}.txt", "DAVIS-2017").read_text().split()
    return [_video(root / "JPEGImages" / resolution / n, root / "Annotations" / resolution / n) for n in names]


def synthetic_videos(root: str | Path) -> list[Video]:
    base = _require(Path(root) / "videos" / "JPEGImages", "embedded set's video")
    return [_video(d, Path(root) / "videos" / "Annotations" / d.name) for d in sorted(base.iterdir())]


def _video(frames_dir: Path, masks_dir: Path) -> Video:
    frames = sorted(_require(frames_dir, "DAVIS-2017").glob("*.jpg"))
    masks = [masks_dir / f"{f.stem}.png" for f in frames]
    if not frames or not masks[0].is_file():
        raise FileNotFoundError(f"{frames_dir}: needs frames and at least the first frame's mask {masks[:1]}")
    return Video(frames_dir.name, frames, masks)
