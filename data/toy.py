"""A procedural toy emotion dataset for smoke tests and the CPU quickstart.

``python -m data.toy --out images/toy --num_classes 4 --per_class 40 --test_per_class 20 --seed 0``

Each class has its own palette and shape, drawn at a random position and size with colour
jitter and pixel noise, so a model can learn the classes from pixels alone. The same seed gives
the same PNG bytes. Only ``train/`` and ``test/`` are written: the dataset loader splits
``val/`` off ``train/`` as it does for real datasets without one.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from data.datasets import MIKELS, SENTIMENT
from utils.errors import UserError, run_cli

SHAPES = ("circle", "square", "triangle", "hstripes", "vstripes", "checker", "ring", "cross")
# (background, foreground) RGB per class index; far apart so colour alone is a usable cue.
PALETTES = (
    ((230, 200, 60), (200, 40, 40)),
    ((40, 40, 60), (240, 240, 240)),
    ((60, 140, 220), (250, 220, 120)),
    ((90, 170, 90), (240, 160, 200)),
    ((130, 110, 40), (60, 200, 180)),
    ((250, 120, 30), (40, 30, 140)),
    ((20, 20, 20), (160, 40, 200)),
    ((150, 150, 170), (30, 80, 90)),
)


def toy_class_names(num_classes: int) -> list[str]:
    """The first K sorted Mikels classes; K=2 gives the binary sentiment classes."""
    if not 2 <= num_classes <= len(MIKELS):
        raise UserError(f"--num_classes {num_classes}: choose between 2 and {len(MIKELS)}")
    return sorted(SENTIMENT) if num_classes == 2 else sorted(MIKELS)[:num_classes]


def _shape_mask(shape: str, xs: np.ndarray, ys: np.ndarray, radius: float) -> np.ndarray:
    """Boolean mask of ``shape`` centred at the origin of the coordinate grids ``xs``, ``ys``."""
    ax, ay = np.abs(xs), np.abs(ys)
    inside = np.maximum(ax, ay) <= radius
    period = max(radius / 2, 2.0)
    if shape == "circle":
        return xs**2 + ys**2 <= radius**2
    if shape == "square":
        return inside
    if shape == "triangle":
        return (ys <= radius) & (ys >= 2 * ax - radius)
    if shape == "hstripes":
        return inside & ((ys // period) % 2 == 0)
    if shape == "vstripes":
        return inside & ((xs // period) % 2 == 0)
    if shape == "checker":
        return inside & (((xs // period) + (ys // period)) % 2 == 0)
    if shape == "ring":
        dist2 = xs**2 + ys**2
        return (dist2 <= radius**2) & (dist2 >= (0.6 * radius) ** 2)
    if shape == "cross":
        return inside & ((ax <= radius / 3) | (ay <= radius / 3))
    raise ValueError(shape)


def draw_toy_image(class_index: int, size: int, rng: np.random.Generator) -> Image.Image:
    """One ``size`` x ``size`` RGB image of class ``class_index``."""
    background, foreground = (np.array(c, dtype=np.float32) for c in PALETTES[class_index])
    background = background + rng.uniform(-25, 25, 3)
    foreground = foreground + rng.uniform(-25, 25, 3)
    radius = rng.uniform(0.2, 0.4) * size
    cx, cy = rng.uniform(radius * 0.7, size - radius * 0.7, 2)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    mask = _shape_mask(SHAPES[class_index], xs - cx, ys - cy, radius)
    pixels = np.where(mask[..., None], foreground, background)
    pixels += rng.normal(0, 10, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def make_toy_dataset(out: str | Path, num_classes: int = 4, per_class: int = 40, test_per_class: int = 20,
                     seed: int = 0, size: int = 64) -> list[str]:
    """Write ``<out>/{train,test}/<class>/*.png``; return the class names in label order.

    The folder appears complete or not at all (built next to ``out``, then renamed).
    """
    class_names = toy_class_names(num_classes)
    if per_class < 1 or test_per_class < 1 or size < 16:
        raise UserError("--per_class and --test_per_class must be >= 1 and --size >= 16")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: folder exists and is not empty; remove it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for split_index, (split, count) in enumerate((("train", per_class), ("test", test_per_class))):
            for class_index, name in enumerate(class_names):
                # One generator per (split, class): each image set is fixed by the seed alone.
                rng = np.random.default_rng([seed, split_index, class_index])
                folder = tmp / split / name
                folder.mkdir(parents=True)
                for i in range(count):
                    draw_toy_image(class_index, size, rng).save(folder / f"{name}_{i:04d}.png")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return class_names


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Draw a procedural toy emotion dataset.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="images/toy", help="dataset folder to create")
    parser.add_argument("--num_classes", type=int, default=4, help="2 (positive/negative) to 8 (Mikels)")
    parser.add_argument("--per_class", type=int, default=40, help="training images per class")
    parser.add_argument("--test_per_class", type=int, default=20, help="test images per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    return parser


def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    class_names = make_toy_dataset(args.out, args.num_classes, args.per_class, args.test_per_class,
                                   args.seed, args.size)
    print(f"toy dataset: {args.out} classes={class_names} train={args.per_class * len(class_names)} "
          f"test={args.test_per_class * len(class_names)} size={args.size}px seed={args.seed}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
