"""Folder-per-class datasets: ``<data_root>/<dataname>/{train,val,test}/<class>/<image>``.

Class names are the sorted folder names of ``train/`` and are saved with every checkpoint.
Without ``val/``, 10% of ``train/`` is split off (stratified, seed 42) and the split is
persisted in ``<output_dir>/<dataname>/split.json`` so every stage sees the same images; the
file records where validation came from (``val_source``, and the choice ``data.prepare``
recorded in the layout's ``manifest.json``, when there is one). Only the presence of ``val/``
decides this, never the dataset's name.
"""
from __future__ import annotations

import logging
import random
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from utils.errors import UserError
from utils.io import read_json, write_json

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")  # the dataset folder's subfolders, in this order
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})
VAL_FRACTION = 0.1
ORIENTATION_TAG = 0x0112  # EXIF orientation
# How to_rgb decodes pixels; part of every cache key, so caches from another decoding are rebuilt.
PIXELS = "rgb8: exif orientation applied, 16-bit scaled"
SPLIT_SEED = 42
# data.prepare's record of how a layout was made, beside its train/ and test/ folders.
LAYOUT_MANIFEST = "manifest.json"
# How validation is made when a layout has no val/ folder (data.prepare records the same words).
VAL_CARVED = f"carved by the loader from train/ (stratified {VAL_FRACTION:.0%}, seed {SPLIT_SEED})"
# --pre_resize: the reference code's preparation of an image for its frozen passes (stage 2's
# features, stage 3's answers, the demo): the longer side shrunk to 1024 px with LANCZOS, aspect
# kept, smaller images untouched; then the processor applies its pixel budget. 0: no pre-resize.
REFERENCE_PRE_RESIZE = 1024

MIKELS = ("amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear", "sadness")
EKMAN = ("anger", "disgust", "fear", "joy", "sadness", "surprise")
SENTIMENT = ("negative", "positive")

# Known datasets (keys lower-case) and the classes their folders should hold.
KNOWN_DATASETS: dict[str, tuple[str, ...]] = {
    "emoset": MIKELS,
    "fi": MIKELS,
    "abstract": MIKELS,
    "artphoto": MIKELS,
    "emotion6": EKMAN,
    "flickr": SENTIMENT,
    "instagram": SENTIMENT,
}


@dataclass(frozen=True)
class Sample:
    path: str   # relative to data_root, e.g. "emoset/train/awe/0001.jpg"
    label: int  # index into class_names


@dataclass
class DatasetSplits:
    name: str
    data_root: Path
    class_names: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    val_from_train: bool  # True when val/ was split off train/
    skipped: list[str] = field(default_factory=list)  # undecodable images left out

    def split(self, name: str) -> list[Sample]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}")
        return getattr(self, name)

    def absolute(self, sample: Sample) -> Path:
        return self.data_root / sample.path

    def summary(self) -> str:
        val = "split off train (seed 42)" if self.val_from_train else "val/"
        return (f"{self.name}: {len(self.class_names)} classes {self.class_names}; "
                f"train {len(self.train)}, val {len(self.val)} ({val}), test {len(self.test)}")


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_split(data_root: Path, split_dir: Path, class_names: Sequence[str],
                folders: dict[str, str] | None = None) -> list[Sample]:
    """The split's images per class; ``folders`` maps a class name to its folder's name in this
    split when the two are spelled in different Unicode normal forms."""
    samples = []
    for label, name in enumerate(class_names):
        folder = split_dir / (folders or {}).get(name, name)
        files = sorted(p for p in folder.rglob("*") if is_image_file(p))
        if not files:
            raise UserError(f"{folder}: class folder holds no images "
                            f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove the folder")
        samples += [Sample(p.relative_to(data_root).as_posix(), label) for p in files]
    return samples


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def _check_same_classes(split_dir: Path, class_names: Sequence[str], train_dir: Path) -> dict[str, str]:
    """``{class name: folder name in split_dir}``. Names equal after Unicode NFC normalisation
    match (macOS writes NFD, most tools NFC: the same word, other bytes)."""
    found = _class_folders(split_dir)
    by_nfc = {_nfc(name): name for name in found}
    if len(by_nfc) == len(found) and sorted(by_nfc) == sorted(map(_nfc, class_names)):
        return {name: by_nfc[_nfc(name)] for name in class_names}
    if found != list(class_names):
        only_train = sorted(set(class_names) - set(found))
        only_here = sorted(set(found) - set(class_names))
        raise UserError(f"{split_dir}: class folders differ from {train_dir}: "
                        f"missing here {only_train}, extra here {only_here}; both must hold the same classes")


def known_classes(dataname: str) -> tuple[str, ...] | None:
    return KNOWN_DATASETS.get(dataname.lower())


def _stratified_split(samples: list[Sample], num_classes: int) -> tuple[list[Sample], list[Sample]]:
    rng = random.Random(SPLIT_SEED)
    train, val = [], []
    for label in range(num_classes):
        group = [s for s in samples if s.label == label]
        rng.shuffle(group)
        n_val = max(1, round(len(group) * VAL_FRACTION)) if len(group) >= 2 else 0
        val += group[:n_val]
        train += group[n_val:]
    return sorted(train, key=lambda s: s.path), sorted(val, key=lambda s: s.path)


def prepared_val(root: Path) -> str | None:
    """The validation choice ``data.prepare`` recorded in ``root``'s manifest (``settings.val``),
    or None (no manifest, an unreadable one, or one written before the choice was recorded)."""
    try:
        settings = read_json(root / LAYOUT_MANIFEST).get("settings")
    except (OSError, ValueError, AttributeError):
        return None
    value = settings.get("val") if isinstance(settings, dict) else None
    return value if isinstance(value, str) else None


def _persisted_split(split_file: Path, train_all: list[Sample], class_names: list[str],
                     train_dir: Path) -> tuple[list[Sample], list[Sample]]:
    """Load the split saved by an earlier stage, or make it and save it. A saved split without
    ``val_source`` (written before it was recorded) is read as it is."""
    by_path = {s.path: s for s in train_all}
    if split_file.exists():
        saved = _read_split_file(split_file)
        saved_paths = set(saved["train"]) | set(saved["val"])
        added = sorted(set(by_path) - saved_paths)
        removed = sorted(saved_paths - set(by_path))
        if saved.get("class_names") != class_names or added or removed:
            detail = (f"classes {saved.get('class_names')} vs {class_names}"
                      if saved.get("class_names") != class_names
                      else f"{len(added)} image(s) added (e.g. {added[:1]}), "
                           f"{len(removed)} removed (e.g. {removed[:1]})")
            raise UserError(f"{split_file} no longer matches the images in {train_dir}: {detail}; "
                            "restore the images, or delete the split file to re-split "
                            "(and retrain every stage, which used the old split)")
        return [by_path[p] for p in saved["train"]], [by_path[p] for p in saved["val"]]
    train, val = _stratified_split(train_all, len(class_names))
    without_val = [name for label, name in enumerate(class_names) if not any(s.label == label for s in val)]
    if without_val:
        log.warning("classes %s have too few training images to spare one for validation: no validation "
                    "image; add images to them or lay out a val/ folder", without_val)
    record = {
        "note": f"validation split: {VAL_FRACTION:.0%} of train/ per class, seed {SPLIT_SEED}",
        "val_source": f"{VAL_CARVED}: the layout has no val/ folder",
    }
    recorded = prepared_val(train_dir.parent)
    if recorded is not None:
        record["prepared_val"] = recorded  # what data.prepare wrote in the layout's manifest.json
    write_json(split_file, {
        **record,
        "class_names": class_names,
        "train": [s.path for s in train],
        "val": [s.path for s in val],
    })
    log.info("split %d train images into %d train / %d val, saved to %s",
             len(train_all), len(train), len(val), split_file)
    return train, val


def _read_split_file(split_file: Path) -> dict:
    """The saved split, checked: readable, train and val lists of paths, disjoint, each image once."""
    advice = "delete it to re-split (and retrain every stage, which used the old split)"
    try:
        saved = read_json(split_file)
    except (OSError, ValueError) as err:
        raise UserError(f"{split_file}: cannot be read ({err.__class__.__name__}); {advice}") from None
    if not isinstance(saved, dict) or not all(isinstance(saved.get(key), list) and
                                              all(isinstance(p, str) for p in saved[key]) for key in ("train", "val")):
        raise UserError(f"{split_file}: damaged (needs 'train' and 'val' lists of image paths); {advice}")
    both = sorted(set(saved["train"]) & set(saved["val"]))
    if both:
        raise UserError(f"{split_file}: {len(both)} image(s) listed in both train and val (e.g. {both[0]}): "
                        f"validation would leak into training; {advice}")
    for key in ("train", "val"):
        if len(set(saved[key])) != len(saved[key]):
            twice = next(p for p in saved[key] if saved[key].count(p) > 1)
            raise UserError(f"{split_file}: {twice} is listed twice in {key}; {advice}")
    return saved


def find_bad_images(data_root: Path, samples: Sequence[Sample]) -> list[str]:
    """Paths (relative) of images PIL cannot decode."""
    bad = []
    for sample in samples:
        try:
            with Image.open(data_root / sample.path) as img:
                img.load()
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
            bad.append(sample.path)
    return bad


def load_dataset(data_root: str | Path, dataname: str, output_dir: str | Path = "outputs",
                 skip_bad_images: bool = False) -> DatasetSplits:
    """Scan the folders, check the class sets, and return the train/val/test samples."""
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise UserError(f"--data_root {data_root}: no such folder; point it at the folder that holds "
                        f"<dataname>/train and <dataname>/test")
    root = data_root / dataname
    if not root.is_dir():
        available = sorted(p.name for p in data_root.iterdir() if p.is_dir())
        raise UserError(f"{root}: no such dataset folder (found: {available or 'nothing'}); "
                        "check --dataname and --data_root")
    train_dir, val_dir, test_dir = root / "train", root / "val", root / "test"
    for required in (train_dir, test_dir):
        if not required.is_dir():
            raise UserError(f"{required}: missing; expected layout {root}/{{train,val,test}}/<class>/<image> "
                            "(val/ is optional)")
    class_names = _class_folders(train_dir)
    if len(class_names) < 2:
        raise UserError(f"{train_dir}: found {len(class_names)} class folder(s); need at least 2")
    expected = known_classes(dataname)
    if expected is not None and sorted(expected) != class_names:
        log.warning("%s: class folders %s differ from the known %s classes %s",
                    train_dir, class_names, dataname, sorted(expected))
    if len(set(map(_nfc, class_names))) < len(class_names):
        raise UserError(f"{train_dir}: class folders {class_names} include two spellings of one name (Unicode NFC "
                        "vs NFD normalisation); merge them into one folder")
    test_folders = _check_same_classes(test_dir, class_names, train_dir)
    train_all = _scan_split(data_root, train_dir, class_names)
    test = _scan_split(data_root, test_dir, class_names, test_folders)
    if val_dir.is_dir():
        val_folders = _check_same_classes(val_dir, class_names, train_dir)
        train, val = train_all, _scan_split(data_root, val_dir, class_names, val_folders)
    else:
        split_file = Path(output_dir) / dataname / "split.json"
        train, val = _persisted_split(split_file, train_all, class_names, train_dir)
    splits = DatasetSplits(dataname, data_root, class_names, train, val, test,
                           val_from_train=not val_dir.is_dir())
    if skip_bad_images:
        bad = set(find_bad_images(data_root, train + splits.val + test))
        if bad:
            log.warning("skipping %d undecodable image(s), e.g. %s", len(bad), sorted(bad)[0])
            splits.train = [s for s in train if s.path not in bad]
            splits.val = [s for s in splits.val if s.path not in bad]
            splits.test = [s for s in test if s.path not in bad]
            splits.skipped = sorted(bad)
    return splits


def needs_normalising(img: Image.Image) -> bool:
    """Whether :func:`to_rgb` changes more than the mode: an EXIF rotation or flip, or 16-bit values."""
    return img.getexif().get(ORIENTATION_TAG, 1) != 1 or img.mode.startswith("I")


def to_rgb(img: Image.Image) -> Image.Image:
    """The pixels every stage, the demo and batch prediction see for a decoded image: the EXIF
    orientation applied (as photo viewers show it), 16-bit values scaled to 8 bits (not clipped
    to white), then RGB."""
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I"):  # I;16, I;16B, I: 16-bit greyscale PNG/TIFF
        values = np.asarray(img, dtype=np.float64)
        scale = 257.0 if img.mode.startswith("I;16") or values.max(initial=0) > 255 else 1.0
        img = Image.fromarray(np.clip(np.rint(values / scale), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def open_image(path: str | Path) -> Image.Image:
    """Decode one image as RGB (see :func:`to_rgb`); an undecodable file is a UserError naming it."""
    try:
        with Image.open(path) as img:
            return to_rgb(img)
    except FileNotFoundError:
        raise UserError(f"{path}: image not found") from None
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"{path}: cannot decode image ({err.__class__.__name__}); "
                        "fix or remove it, or pass --skip_bad_images") from None


def pre_resize(img: Image.Image, longest_side: int | None) -> Image.Image:
    """``img`` with its longer side shrunk to ``longest_side`` px (LANCZOS, aspect kept), as the
    reference code prepares images before the processor; a smaller image, or ``longest_side``
    0 or None (no pre-resize: an old record without the setting), is returned unchanged."""
    if not longest_side:
        return img
    width, height = img.size
    if max(width, height) <= longest_side:
        return img
    scale = longest_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return img.resize(size, Image.Resampling.LANCZOS)


def pre_resized(images, longest_side: int | None) -> list[Image.Image]:
    """:func:`pre_resize` of each image."""
    return [pre_resize(image, longest_side) for image in images]


def pre_resize_key(longest_side: int | None) -> dict:
    """The cache-key entry of a pre-resize: none without one, so caches built before the setting
    existed (no pre-resize) still match when it is off."""
    return {"pre_resize": longest_side} if longest_side else {}


class ImageDataset:
    """Lazy map-style dataset over samples: ``(transform(image), label)``; images open on access."""

    def __init__(self, data_root: str | Path, samples: Sequence[Sample],
                 transform: Callable | None = None):
        self.data_root = Path(data_root)
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        image = open_image(self.data_root / sample.path)
        return (self.transform(image) if self.transform else image), sample.label
