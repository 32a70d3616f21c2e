"""Speed of the leakage and hygiene check (``python -m data.prepare check``) on one core.

``python -m bench.prepare_check [--images 3000]``: writes a layout of photo-sized JPEGs
(512x384, quality 90, smooth colour fields with sensor-like noise, ~50-90 KB each; 80/5/15 over
8 classes) to a temporary folder, pins this process to one CPU core, and times the whole check
(reading, SHA-256, reduced-scale decode, difference hash, near-duplicate search across splits).
For context it also times a full-resolution decode of a subset, what the check would cost
without ``Image.draft``. The files were just written, so they are read from the page cache: a
cold disk adds its read time (about 50 KB per image). Target: at least 2,000 images a minute (~33 images/s) on one core.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench import TARGETS_KEY, target_row
from data.hygiene import check_layout

TARGET_PER_MINUTE = 2000
SIZE = (512, 384)
CLASSES = 8
FULL_DECODE_SAMPLE = 200


def write_layout(root: Path, images: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    # one noise pattern for all images (drawing it per image would dominate the set-up time);
    # the smooth fields differ per image, and they decide the difference hash
    noise = rng.integers(-12, 13, (SIZE[1], SIZE[0], 3)).astype(np.int16)
    for index in range(images):
        slot = (index // CLASSES) % 20  # 15/20 train, 1/20 val, 3/20 test within every class
        split = "test" if slot < 3 else "val" if slot == 3 else "train"
        folder = root / split / f"class{index % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        blocks = (rng.random((6, 8, 3)) * 255).astype(np.uint8)
        field = np.asarray(Image.fromarray(blocks).resize(SIZE, Image.Resampling.BICUBIC), dtype=np.int16)
        noisy = np.clip(field + noise, 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"{index:05d}.jpg", quality=90)


def _full_decode_seconds(root: Path) -> float:
    files = sorted(root.rglob("*.jpg"))[:FULL_DECODE_SAMPLE]
    start = time.perf_counter()
    for file in files:
        with Image.open(file) as img:
            img.convert("L")
    return (time.perf_counter() - start) / len(files)


def _pin_to_one_core():
    if hasattr(os, "sched_getaffinity"):
        previous = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(previous)})
        return previous
    return None


def run(images: int = 3000) -> dict:
    root = Path(tempfile.mkdtemp(prefix="bench_prepare_check_"))
    previous = _pin_to_one_core()
    try:
        write_layout(root, images)
        megabytes = sum(f.stat().st_size for f in root.rglob("*.jpg")) / 2**20
        start = time.perf_counter()
        report = check_layout(root, progress=False)
        seconds = time.perf_counter() - start
        per_image_full = _full_decode_seconds(root)
    finally:
        if previous is not None:
            os.sched_setaffinity(0, previous)
        shutil.rmtree(root, ignore_errors=True)
    per_minute = images / seconds * 60
    result = {
        "images": images,
        "megabytes": round(megabytes, 1),
        "check_seconds": round(seconds, 2),
        "images_per_second": round(images / seconds, 1),
        "images_per_minute": round(per_minute),
        "full_decode_over_check_per_image": round(per_image_full / (seconds / images), 2),
        "findings": report["near_duplicate_pairs"] + len(report["cross_split_duplicates"]),
        TARGETS_KEY: [target_row("leakage check, images per minute on one core", per_minute, ">=",
                                 TARGET_PER_MINUTE, unit="/min")],
    }
    print(f"check of {images} JPEGs ({SIZE[0]}x{SIZE[1]}, {megabytes:.0f} MB) on one core: {seconds:.1f} s, "
          f"{result['images_per_second']:.0f} images/s = {result['images_per_minute']} images/min "
          f"(target >= {TARGET_PER_MINUTE}/min: {'met' if result[TARGETS_KEY][0]['met'] else 'MISSED'}); "
          f"a full-resolution decode alone would take {result['full_decode_over_check_per_image']}x "
          f"the whole check's time per image; findings on distinct images: {result['findings']} (expected 0)")
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    run(parser.parse_args(argv).images)


if __name__ == "__main__":
    sys.exit(main())
