"""A folder of labelled images: index it, check every file, split it, and serve it.

Layouts: ``DATA/class/*.jpg`` (a seeded, stratified validation fraction is split off) or
``DATA/train/class/*`` beside one of ``val``, ``validation`` or ``test``.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from transferlab.data.images import MAX_PIXELS, BadImage, load_rgb
from transferlab.errors import UserError
from transferlab.files import is_image_name

VAL_NAMES = ("val", "validation", "test")


@dataclass
class Sample:
    path: Path
    label: int | tuple[int, ...]  # a class index; with several labels per image, the indices of all (maybe none)


def label_set(sample: Sample) -> tuple[int, ...]:
    """The classes an image is labelled with, whether it has one label or several."""
    return sample.label if isinstance(sample.label, tuple) else (sample.label,)


def split_key(sample: Sample) -> int:
    """What a split stratifies on: the class, or the first of several labels (-1: an image with none)."""
    return next(iter(label_set(sample)), -1)


def targets(samples: list[Sample], num_classes: int, multi_label: bool) -> list:
    """What the loss compares with: class indices, or with several labels per image a 0/1 row per image."""
    if not multi_label:
        return [s.label for s in samples]
    rows = np.zeros((len(samples), num_classes), dtype=np.float32)
    for i, s in enumerate(samples):
        rows[i, list(label_set(s))] = 1
    return list(rows)


@dataclass
class DataIndex:
    """What training needs to know about a dataset folder."""

    root: Path
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    layout: str  # "split-folders" or "val-split"
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    multi_label: bool = False  # several labels per image (``Sample.label`` a tuple)
    # with several labels: training images held out of training, on which each class's threshold is chosen
    tune: list[Sample] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "root": str(Path(self.root).resolve()),
            "layout": self.layout,
            "classes": self.classes,
            "num_train_images": len(self.train),
            "num_val_images": len(self.val),
            "train_per_class": dict(sorted(Counter(self.classes[c] for s in self.train for c in label_set(s)).items())),
            "skipped_files": len(self.skipped),
            "multi_label": self.multi_label,
            "num_threshold_images": len(self.tune),
        }


def check_image(path: Path) -> str | None:
    """Why ``path`` is not a usable image, or None. Decodes JPEGs at reduced scale, so it is quick."""
    try:
        with Image.open(path) as im:
            if im.width * im.height <= MAX_PIXELS:
                if im.format == "JPEG":
                    im.draft("RGB", (64, 64))
                im.load()
                return None
    except Exception:  # noqa: BLE001, S110 - load_rgb below gives the precise reason
        pass
    try:
        load_rgb(path)
    except BadImage as e:
        return str(e)
    return None


def class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_classes(folder: Path, classes: list[str], skipped: list) -> list[Sample]:
    samples = []
    for label, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        for path in sorted(p for p in class_dir.rglob("*") if p.is_file() and is_image_name(p)):
            why = check_image(path)
            if why:
                skipped.append((str(path), why))
            else:
                samples.append(Sample(path, label))
    return samples


def split_folder(root: Path) -> Path | None:
    for name in VAL_NAMES:
        if (root / name).is_dir():
            return root / name
    return None


def index_folder(root: str | Path, val_split: float = 0.2, seed: int = 0) -> DataIndex:
    """Index a dataset folder, checking every image; one clear UserError for each unusable layout."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"data folder not found: {root}: pass a folder with one sub-folder per class")
    if not root.is_dir() or not os.access(root, os.R_OK | os.X_OK):
        raise UserError(f"cannot read data folder {root}: check it is a folder you may read")
    skipped: list[tuple[str, str]] = []
    val_dir = split_folder(root)
    if (root / "train").is_dir() and val_dir:
        loose = [p.name for p in class_dirs(root) if p.name not in ("train", *VAL_NAMES)]
        if loose:
            raise UserError(
                f"{root} mixes split folders (train/, {val_dir.name}/) with class folders ({', '.join(loose[:3])}): "
                "move the class folders into train/ or remove them"
            )
        classes = [p.name for p in class_dirs(root / "train")]
        _check_classes(root / "train", classes)
        extra = sorted({p.name for p in class_dirs(val_dir)} - set(classes))
        if extra:
            raise UserError(
                f"class '{extra[0]}' is in {val_dir} but not in {root / 'train'}: add its training images or remove it"
            )
        train = scan_classes(root / "train", classes, skipped)
        val = scan_classes(val_dir, classes, skipped)
        layout = "split-folders"
    else:
        classes = [p.name for p in class_dirs(root)]
        _check_classes(root, classes)
        samples = scan_classes(root, classes, skipped)
        train, val = stratified_split(samples, val_split, seed)
        layout = "val-split"
    index = DataIndex(root, classes, train, val, layout, skipped)
    check_counts(index)
    return index


def _check_classes(folder: Path, classes: list[str]) -> None:
    if not classes:
        has_images = any(is_image_name(p) for p in folder.iterdir() if p.is_file())
        hint = "images must sit in one sub-folder per class" if has_images else "it holds no class folders"
        raise UserError(f"no class folders in {folder}: {hint} (e.g. {folder}/cats/1.jpg, {folder}/dogs/2.jpg)")
    if len(classes) < 2:
        raise UserError(f"only one class ('{classes[0]}') in {folder}: a classifier needs at least two class folders")


def check_counts(index: DataIndex) -> None:
    train_counts = Counter(c for s in index.train for c in label_set(s))
    if not index.train:
        raise UserError(f"no readable images in {index.root}: add .jpg/.png files inside the class folders")
    for label, name in enumerate(index.classes):
        if not train_counts.get(label):
            what = f"label '{name}'" if index.layout == "csv" else f"class folder '{name}'"
            raise UserError(f"{what} in {index.root} has no readable training images: add some or remove it")
    if not index.val:
        raise UserError(f"no validation images in {index.root}: add a val/ folder or use a larger --val-split")


def stratified_split(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Seeded split keeping each class's proportion; at least one validation image per class of 2+."""
    if not 0 < fraction < 1:
        raise UserError(f"--val-split {fraction} must be between 0 and 1 (e.g. 0.2)")
    kept, held = stratified_indices([split_key(s) for s in samples], fraction, seed)
    return [samples[i] for i in kept], [samples[i] for i in held]


def stratified_indices(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """The one split rule (the data's validation split, the head fit's holdout): ``fraction`` of each class, at
    least one of a class of two or more, seeded; indices kept and held out."""
    rng = random.Random(seed)
    kept, held = [], []
    for label in sorted(set(labels)):
        idx = [i for i, x in enumerate(labels) if x == label]
        rng.shuffle(idx)
        k = max(1, round(len(idx) * fraction)) if len(idx) >= 2 else 0
        held += idx[:k]
        kept += idx[k:]
    return kept, held


def file_digest(path: Path) -> str:
    """Content hash of an image file: cache entries follow the bytes, not the name."""
    return hashlib.sha1(path.read_bytes()).hexdigest()


def median_side(samples: list[Sample], limit: int = 64) -> int:
    """Median shorter side of a sample of the images (header reads only)."""
    sides = []
    for s in samples[:: max(1, len(samples) // limit)][:limit]:
        with Image.open(s.path) as im:
            sides.append(min(im.size))
    return sorted(sides)[len(sides) // 2]
