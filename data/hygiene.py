"""Leakage and hygiene check of a prepared layout ``<root>/{train,val,test}/<class>/<image>``.

Every image is read once: a SHA-256 of its bytes finds byte-identical duplicates, a 64-bit
difference hash (dHash: 9x8 grey thumbnail, one bit per left/right brightness comparison) finds
near-duplicates (the same photo re-encoded or resized) by Hamming distance, and the decode
itself finds undecodable files. Also reported: tiny images and class imbalance. JPEGs are
decoded at a reduced scale (``Image.draft``), which is what makes the check fast; the bytes are
still fully decoded, so a truncated file is caught.
"""
from __future__ import annotations

import hashlib
import io
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from data.datasets import SPLITS, is_image_file
from utils.errors import UserError

NEAR_DUPLICATE_BITS = 6   # dHash distance (of 64 bits) at or below which two images count as near-duplicates
MIN_SIDE = 32             # images with a shorter side (pixels) are reported as tiny
MAX_IMBALANCE = 10.0      # largest / smallest class in train above which the split is flagged
MAX_LISTED = 10_000       # near-duplicate pairs kept in the report (the total is always counted)
_HASH_W, _HASH_H = 9, 8


@dataclass
class ImageRecord:
    path: str            # relative to the layout root, e.g. "test/awe/0001.jpg"
    split: str
    class_name: str
    sha256: str = ""
    dhash: int | None = None  # None when the image does not decode
    width: int = 0
    height: int = 0
    error: str = ""


def broken_links(root: Path) -> list[str]:
    """Symbolic links in the layout whose target is gone (the source was moved or deleted):
    the loader would silently skip them."""
    return sorted(p.relative_to(root).as_posix() for split in SPLITS if (root / split).is_dir()
                  for p in (root / split).rglob("*") if p.is_symlink() and not p.exists())


def scan_layout(root: Path) -> list[ImageRecord]:
    """Every image of the layout, sorted by path (hidden folders and non-images are skipped,
    as the dataset loader skips them)."""
    if not (root / "train").is_dir():
        raise UserError(f"{root}: not a prepared layout; expected {root}/train/<class>/<image> "
                        "(and test/, optionally val/)")
    records = []
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for file in sorted(p for p in class_dir.rglob("*") if is_image_file(p)):
                records.append(ImageRecord(file.relative_to(root).as_posix(), split, class_dir.name))
    return records


def difference_hash(image: Image.Image) -> int:
    """64-bit dHash: bit i is set where a pixel of the 9x8 grey thumbnail is brighter than its
    left neighbour."""
    small = image.convert("L").resize((_HASH_W, _HASH_H), Image.Resampling.BOX)
    pixels = np.asarray(small, dtype=np.int16)
    bits = (pixels[:, 1:] > pixels[:, :-1]).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def fingerprint(record: ImageRecord, root: Path) -> None:
    """Fill in the record's content hash, dHash and size (or its decode error)."""
    try:
        data = (root / record.path).read_bytes()
    except OSError as err:
        record.error = f"unreadable ({err.__class__.__name__})"
        return
    record.sha256 = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as img:
            record.width, record.height = img.size
            # JPEG only: decode at 1/2..1/8 scale, never below 4x the thumbnail. Other formats
            # ignore the hint and decode fully.
            img.draft("L", (_HASH_W * 4, _HASH_H * 4))
            record.dhash = difference_hash(img)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError, SyntaxError) as err:
        record.error = err.__class__.__name__


def _popcount(values: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(values)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return table[values.view(np.uint8)].reshape(*values.shape, 8).sum(-1)


def near_duplicate_pairs(left: list[ImageRecord], right: list[ImageRecord], max_bits: int):
    """(left, right, distance) for every pair whose dHashes differ in at most ``max_bits`` bits
    and whose bytes differ (byte-identical pairs are reported as duplicates)."""
    if not left or not right:
        return []
    right_hashes = np.array([r.dhash for r in right], dtype=np.uint64)
    left_hashes = np.array([r.dhash for r in left], dtype=np.uint64)
    chunk = max(1, 2_000_000 // len(right))  # bounded memory: ~16 MB of XORs at a time
    pairs = []
    for start in range(0, len(left), chunk):
        distances = _popcount(left_hashes[start:start + chunk, None] ^ right_hashes[None, :])
        for i, j in zip(*np.nonzero(distances <= max_bits)):
            a, b = left[start + i], right[j]
            if a.sha256 != b.sha256:
                pairs.append((a, b, int(distances[i, j])))
    return pairs


def _imbalance(counts: dict[str, dict[str, int]]) -> dict[str, dict]:
    out = {}
    for split, per_class in counts.items():
        if per_class:
            largest = max(per_class, key=per_class.get)
            smallest = min(per_class, key=per_class.get)
            out[split] = {"largest": [largest, per_class[largest]],
                          "smallest": [smallest, per_class[smallest]],
                          "ratio": round(per_class[largest] / max(1, per_class[smallest]), 2)}
    return out


def check_layout(root: str | Path, near_bits: int = NEAR_DUPLICATE_BITS, min_side: int = MIN_SIDE,
                 max_imbalance: float = MAX_IMBALANCE, progress: bool = True) -> dict:
    """Read every image of the layout once and return the report (a JSON-ready dict)."""
    root = Path(root)
    records = scan_layout(root)
    start = time.perf_counter()
    for record in tqdm(records, desc="checking", unit="img", disable=not progress):
        fingerprint(record, root)
    seconds = time.perf_counter() - start

    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    by_content: dict[str, list[ImageRecord]] = defaultdict(list)
    for record in records:
        counts[record.split][record.class_name] += 1
        if record.sha256:
            by_content[record.sha256].append(record)
    groups = [group for group in by_content.values() if len(group) > 1]
    cross_split = [[r.path for r in g] for g in groups if len({r.split for r in g}) > 1]
    conflicting = [[r.path for r in g] for g in groups if len({r.class_name for r in g}) > 1]

    decoded = {split: [r for r in records if r.split == split and r.dhash is not None] for split in SPLITS}
    near = []
    for i, first in enumerate(SPLITS):
        for second in SPLITS[i + 1:]:
            near += near_duplicate_pairs(decoded[first], decoded[second], near_bits)
    counts = {split: dict(sorted(per_class.items())) for split, per_class in counts.items()}
    imbalance = _imbalance(counts)
    return {
        "images": len(records),
        "seconds": round(seconds, 2),
        "images_per_second": round(len(records) / seconds, 1) if seconds > 0 else None,
        "settings": {"near_duplicate_bits": near_bits, "min_side": min_side, "max_imbalance": max_imbalance},
        "counts": counts,
        "cross_split_duplicates": cross_split,
        "conflicting_label_duplicates": conflicting,
        "within_split_duplicates": sum(1 for g in groups if len({r.split for r in g}) == 1),
        "near_duplicates_across_splits": [[a.path, b.path, d] for a, b, d in near[:MAX_LISTED]],
        "near_duplicate_pairs": len(near),
        "undecodable": [[r.path, r.error] for r in records if r.error],
        "broken_links": broken_links(root),
        "tiny": [[r.path, r.width, r.height] for r in records
                 if not r.error and min(r.width, r.height) < min_side],
        "imbalance": imbalance,
        "imbalanced": bool(imbalance.get("train", {}).get("ratio", 0) > max_imbalance),
        "dropped": [],
    }


_ORDER = {split: i for i, split in enumerate(SPLITS)}


def drop_cross_split_duplicates(root: str | Path, report: dict) -> list[str]:
    """Delete the later-split copies (val after train, test after train or val) of every
    byte-identical group; the copy in the earliest split stays. A copy that is the last image
    of its class folder is kept (the loader refuses empty class folders) and named in a warning.
    Records what was removed in ``report["dropped"]``."""
    root = Path(root)
    dropped = []
    for group in report["cross_split_duplicates"]:
        first_split = min((path.split("/")[0] for path in group), key=_ORDER.get)
        for path in group:
            split, class_name = path.split("/")[:2]
            if split == first_split:
                continue
            if report["counts"][split][class_name] <= 1:
                print(f"warning: kept {path}: it is the last image of its class folder")
                continue
            (root / path).unlink()
            report["counts"][split][class_name] -= 1
            dropped.append(path)
    report["dropped"] = dropped
    return dropped


def _examples(items: list, show: int = 3) -> str:
    shown = ["  ".join(map(str, item)) if isinstance(item, (list, tuple)) else str(item) for item in items[:show]]
    return "; ".join(shown) + (f"; ... ({len(items) - show} more)" if len(items) > show else "")


def format_report(report: dict) -> str:
    """A short human summary of a check report."""
    settings = report["settings"]
    speed = report.get("images_per_second")
    lines = [f"checked {report['images']} images"
             + (f" in {report['seconds']:.1f} s ({speed:.0f} images/s)" if speed else "")]
    findings = [
        ("byte-identical duplicates across splits (leakage)", report["cross_split_duplicates"],
         "groups; --drop_cross_split_duplicates removes the later-split copies"),
        ("byte-identical duplicates under different classes", report["conflicting_label_duplicates"], "groups"),
        (f"near-duplicates across splits (dHash distance <= {settings['near_duplicate_bits']} of 64)",
         report["near_duplicates_across_splits"], "pairs: review them by eye"),
        ("undecodable images", report["undecodable"], "files: fix or remove them (or --skip_bad_images later)"),
        ("broken symbolic links", report["broken_links"], "files: their source moved; prepare again"),
        (f"tiny images (shorter side < {settings['min_side']} px)", report["tiny"], "files"),
    ]
    for title, items, unit in findings:
        total = report["near_duplicate_pairs"] if items is report["near_duplicates_across_splits"] else len(items)
        lines.append(f"  {title}: {total}" + (f" {unit}: {_examples(items)}" if items else ""))
    if report["within_split_duplicates"]:
        lines.append(f"  byte-identical duplicates within one split: {report['within_split_duplicates']} groups")
    train = report["imbalance"].get("train")
    if train:
        flag = " (imbalanced: consider macro-F1 and class weights)" if report["imbalanced"] else ""
        lines.append(f"  class balance in train: largest {train['largest'][0]} {train['largest'][1]}, "
                     f"smallest {train['smallest'][0]} {train['smallest'][1]}, ratio {train['ratio']}{flag}")
    if report["dropped"]:
        lines.append(f"  dropped {len(report['dropped'])} later-split duplicate(s): {_examples(report['dropped'])}")
    return "\n".join(lines)
