"""Cost of the whole depth x alpha ablation grid (5 x 5 heads, one seed) relative to one head run.

``python -m bench.sweep_cost``: on the toy world of ``bench.distill_cost`` (2000 images, the tiny
VLM, an untrained tiny teacher checkpoint given with --teacher_checkpoint so teacher fine-tuning,
the same for every setting, is left out) one process times
(1) one head run: ``train_distillation.py`` with the paper's setting into a fresh folder, so it
    encodes every image with the frozen VLM and the teacher, then trains one head (5 epochs);
(2) the grid: ``--depth 1 2 3 4 5 --alpha 0 0.25 0.5 0.75 1`` into the same folder, so all 25
    heads train on the cached features (each kept in distill/runs/).
A first, untimed run pays the one-off import costs. The target, (2) <= 3 x (1), says a whole grid
costs a small multiple of one run because the frozen passes are paid once; ``grid_over_separate``
compares the grid with 25 separate cold runs (25 x (1)). The tiny VLM encodes an image in ~2 ms,
so here training the heads (deeper ones cost more) weighs far more against the feature pass than
next to a 7B encoder.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from bench import TARGETS_KEY, print_results, target_row
from bench.distill_cost import EPOCHS, stage_seconds, warm_world

DEPTHS = ("1", "2", "3", "4", "5")
ALPHAS = ("0", "0.25", "0.5", "0.75", "1")
TARGET = 3.0  # the 25-head grid on cached features at most 3x one cold head run


def run() -> dict:
    """Wall times (s) of one cold head run and of the warm 5 x 5 grid, and their ratio."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images, vlm, teacher = warm_world(root)
        one_run = stage_seconds(images, vlm, teacher, root / "outputs")
        grid = stage_seconds(images, vlm, teacher, root / "outputs", "--depth", *DEPTHS, "--alpha", *ALPHAS)
        kept = len(list((root / "outputs" / "toy" / "distill" / "runs").glob("*/meta.json")))
    ratio = grid / one_run
    result = {"heads": len(DEPTHS) * len(ALPHAS), "kept_runs": kept, "head_epochs": EPOCHS,
              "one_run_s": round(one_run, 2), "grid_s": round(grid, 2), "grid_over_one_run": round(ratio, 3),
              "grid_over_separate": round(grid / (len(DEPTHS) * len(ALPHAS) * one_run), 3),
              TARGETS_KEY: [target_row("5 x 5 depth x alpha grid on cached features / one head run (features computed)",
                                       ratio, "<=", TARGET)]}
    print_results(result)
    return result

if __name__ == "__main__":
    run()
