"""Peak memory of stage 2 on 50 vs 500 photo-sized JPEGs per class: ``python -m bench.memory``.

Images are opened lazily, so ten times the images should cost little extra memory. The images are
JPEGs the size of real dataset photos (500x375 like FI's, and 800x600, 1024x768, 1280x960), so
decoding every image up front would at least double the peak. A control run checks that the
measurement can see this: the same stage started by a wrapper that first decodes every image of the
dataset and keeps it, as a loader holding all images would; its ratio must show the growth.
Each run is a fresh process (whole ``train_distillation.py``, one teacher and one head epoch) whose
peak RSS is measured by the OS.

Targets (set before measuring): lazy ratio <= 1.25x; control ratio >= 2x.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

from bench import TARGETS_KEY, format_targets, target_row
from data.datasets import load_dataset
from data.toy import make_toy_dataset
from models.tiny import build_tiny_vlm
from utils.checkpoints import write_meta

REPO = Path(__file__).resolve().parents[1]
CLASSES = 2
SMALL, LARGE = 50, 500  # training images per class
PHOTO_SIZES = ((500, 375), (800, 600), (1024, 768), (1280, 960))
LAZY_TARGET = 1.25
CONTROL_TARGET = 2.0

_MEASURE = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) if r.returncode == 0 "
            "else sys.exit(r.returncode)")
# The control: decode every image under argv[1] and hold it, then run the script argv[2:].
_DECODE_ALL = ("import runpy, sys; from pathlib import Path; from data.datasets import is_image_file, open_image; "
               "held = [open_image(p) for p in sorted(Path(sys.argv[1]).rglob('*')) if is_image_file(p)]; "
               "print(f'holding {len(held)} decoded images', file=sys.stderr); "
               "sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def photo_dataset(root: Path, per_class: int) -> None:
    """Toy images re-saved as JPEGs of photo sizes (cycling through PHOTO_SIZES)."""
    make_toy_dataset(root / "toy", num_classes=CLASSES, per_class=per_class,
                     test_per_class=max(10, per_class // 10), seed=0, size=64)
    sizes = itertools.cycle(PHOTO_SIZES)
    for path in sorted((root / "toy").rglob("*.png")):
        with Image.open(path) as image:
            image.convert("RGB").resize(next(sizes), Image.BILINEAR).save(path.with_suffix(".jpg"), quality=90)
        path.unlink()


def peak_rss_mib(root: Path, out: Path, vlm_dir: Path, decode_all: bool) -> float:
    splits = load_dataset(root, "toy", out)
    # Stage 2 reads only stage 1's meta.json (class names, base VLM, pixel budget).
    write_meta(out / "toy" / "vlm", "vlm", splits.class_names, base_model=str(vlm_dir))
    command = ["train_distillation.py", "--dataname", "toy", "--data_root", str(root), "--output_dir", str(out),
               "--vlm_model", str(vlm_dir), "--config", "configs/toy_distill.yaml", "--teacher_epochs", "1",
               "--epochs", "1", "--retrain_teacher"]
    command = [sys.executable, *(["-c", _DECODE_ALL, str(root / "toy")] if decode_all else []), *command]
    result = subprocess.run([sys.executable, "-c", _MEASURE, *command], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    if result.returncode != 0:
        raise RuntimeError(f"stage 2 failed on {root}:\n{result.stderr[-2000:]}")
    kib = int(result.stdout.strip().splitlines()[-1])  # Linux reports ru_maxrss in KiB
    return kib / 1024


def run() -> dict:
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        vlm_dir = build_tiny_vlm(work / "tiny-qwen2-vl")
        for per_class in (SMALL, LARGE):
            root = work / f"images_{per_class}"
            photo_dataset(root, per_class)
            for decode_all in (False, True):
                kind = "control" if decode_all else "lazy"
                peaks[kind, per_class] = peak_rss_mib(root, work / f"outputs_{per_class}_{kind}", vlm_dir, decode_all)
    lazy, control = (peaks["lazy", LARGE] / peaks["lazy", SMALL], peaks["control", LARGE] / peaks["control", SMALL])
    result = {f"{kind}_peak_rss_mib_{n}_per_class": round(value, 1) for (kind, n), value in peaks.items()}
    result.update({"lazy_ratio": round(lazy, 3), "control_ratio": round(control, 3), TARGETS_KEY: [
        target_row(f"stage 2 peak RSS, {LARGE} vs {SMALL} photo-sized JPEGs per class (lazy)", lazy, "<=",
                   LAZY_TARGET),
        target_row("the same with every image decoded up front (control: must grow)", control, ">=",
                   CONTROL_TARGET)]})
    print(f"stage 2 peak RSS, {SMALL} -> {LARGE} images/class: lazy {peaks['lazy', SMALL]:.0f} -> "
          f"{peaks['lazy', LARGE]:.0f} MiB ({lazy:.2f}x); all decoded up front {peaks['control', SMALL]:.0f} -> "
          f"{peaks['control', LARGE]:.0f} MiB ({control:.2f}x)")
    return result


if __name__ == "__main__":
    results = run()
    print(format_targets(results[TARGETS_KEY]))
