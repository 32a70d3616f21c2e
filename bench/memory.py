"""Peak memory of stage 2 on 100 vs 1000 toy images per class: ``python -m bench.memory``.

Images are opened lazily, so ten times the images should cost almost no extra memory: the
ratio of the two peak RSS values should stay near 1. Each run is a fresh process (whole
``train_distillation.py`` with one teacher and one head epoch) measured by the OS.
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLASSES = 2

_MEASURE = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) if r.returncode == 0 "
            "else sys.exit(r.returncode)")


def peak_rss_mib(per_class: int, work: Path, vlm_dir: Path) -> float:
    from data.datasets import load_dataset
    from data.toy import make_toy_dataset
    from utils.checkpoints import write_meta

    root = work / f"images_{per_class}"
    make_toy_dataset(root / "toy", num_classes=CLASSES, per_class=per_class,
                     test_per_class=max(10, per_class // 10), seed=0, size=64)
    out = work / f"outputs_{per_class}"
    splits = load_dataset(root, "toy", out)
    # Stage 2 reads only stage 1's meta.json (class names, base VLM, pixel budget).
    write_meta(out / "toy" / "vlm", "vlm", splits.class_names, base_model=str(vlm_dir))
    command = [sys.executable, "train_distillation.py", "--dataname", "toy",
               "--data_root", str(root), "--output_dir", str(out), "--vlm_model", str(vlm_dir),
               "--config", "configs/toy_distill.yaml", "--teacher_epochs", "1", "--epochs", "1"]
    result = subprocess.run([sys.executable, "-c", _MEASURE, *command], cwd=REPO,
                            capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    if result.returncode != 0:
        raise RuntimeError(f"stage 2 failed on {per_class} images per class:\n{result.stderr[-2000:]}")
    kib = int(result.stdout.strip().splitlines()[-1])  # Linux reports ru_maxrss in KiB
    return kib / 1024


def run() -> dict:
    from models.tiny import build_tiny_vlm

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        vlm_dir = build_tiny_vlm(work / "tiny-qwen2-vl")
        small = peak_rss_mib(100, work, vlm_dir)
        large = peak_rss_mib(1000, work, vlm_dir)
    result = {"peak_rss_mib_100_per_class": round(small, 1),
              "peak_rss_mib_1000_per_class": round(large, 1),
              "rss_ratio_1000_over_100": round(large / small, 3)}
    print(f"stage 2 peak RSS: {small:.0f} MiB at 100 images/class, {large:.0f} MiB at 1000 "
          f"({large / small:.2f}x for 10x the images)")
    return result


if __name__ == "__main__":
    print(run())
