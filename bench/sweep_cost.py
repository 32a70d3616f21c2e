"""Cost of stage 2's ablation sweeps, whose heads train together as one ensemble (engine.distill.
train_heads), against one head: ``python -m bench.sweep_cost``.

On the toy world of ``bench.distill_cost`` (2000 images, the tiny VLM's 64-d features, an untrained
tiny teacher checkpoint given with --teacher_checkpoint so teacher fine-tuning, the same for every
setting, is left out) one process times
(1) one head run: ``train_distillation.py`` with the paper's setting into a fresh folder, so it
    encodes every image with the frozen VLM and the teacher, then trains one head (5 epochs, the
    toy config's batch 16);
(2) the grid: ``--depth 1 2 3 4 5 --alpha 0 0.25 0.5 0.75 1`` into the same folder, so all 25
    heads train, as one ensemble, on the cached features (each kept in distill/runs/);
(3) the paper's ablation sweep at batch 1 (one optimiser step per image, the default) on those
    cached features: depths 1-5 at alpha 0.5 and alphas 0, 0.25, 0.75, 1 at depth 1, 3 seeds each,
    27 heads, trained as one ensemble, next to one head (depth 1, alpha 0.5), to its 15 depth-1
    heads alone as one ensemble (the part whose steps are bound by per-step overhead) and to the
    same 27 heads trained head by head (engine.distill.train_head each), ``PAPER_EPOCHS`` epoch(s)
    each (the ratios do not depend on the number of epochs);
(4) stage 3's gate ablation at batch 1: the 5 gates x 3 seeds as one ensemble next to one gate
    (concat_linear) and to the 15 gates one by one, on ``GATE_ROWS`` training examples of random
    gate inputs (4 classes), ``PAPER_EPOCHS`` epoch(s), without a target;
(5) the same as (3) at the width of Qwen2-VL-7B's features (3,584-d, random tensors, ``WIDE_ROWS``
    training rows): printed without a target, since there a batch-1 step on a CPU is bound by the
    memory traffic of the weights, their gradients and Adam's moments, which an ensemble does not
    reduce.
A first, untimed run pays the one-off import costs. Targets, fixed before measuring: (2) <= 3 x
(1), a whole grid a small multiple of one run; (3) <= 3 x one head.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from bench import TARGETS_KEY, print_results, target_row
from bench.distill_cost import EPOCHS, stage_seconds, warm_world
from data.datasets import load_dataset
from engine.distill import train_head, train_heads
from engine.gate import GateData, train_gate, train_gates
from models.gates import GATES

DEPTHS = ("1", "2", "3", "4", "5")
ALPHAS = ("0", "0.25", "0.5", "0.75", "1")
TARGET = 3.0  # the 25-head grid on cached features at most 3x one cold head run
PAPER_TARGET = 3.0  # the paper's 27-head sweep at batch 1 at most 3x one head's training
SEEDS = (0, 1, 2)
PAPER_SWEEP = ([{"depth": depth, "alpha": 0.5, "seed": seed} for depth in (1, 2, 3, 4, 5) for seed in SEEDS]
               + [{"depth": 1, "alpha": alpha, "seed": seed} for alpha in (0.0, 0.25, 0.75, 1.0) for seed in SEEDS])
PAPER_EPOCHS = 1
WIDE_DIM, WIDE_ROWS = 3584, 100
GATE_ROWS, GATE_SEEDS = 1800, (0, 1, 2)
# The toy config's head settings (configs/toy_distill.yaml), at batch 1.
HEAD = {"lr": 1e-3, "standardize": True, "batch_size": 1}


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paper_sweep(features: dict, teacher: dict, labels: dict, epochs: int) -> dict:
    """Seconds of one head, of the 27-head sweep as one ensemble, of its 15 depth-1 heads alone as
    one ensemble, and of the 27 heads one by one."""
    in_dim, classes = features["train"].shape[1], teacher["train"].shape[1]
    args = (features, teacher, labels, in_dim, classes)
    one = _seconds(lambda: train_head(*args, depth=1, alpha=0.5, seed=0, epochs=epochs, **HEAD))
    ensemble = _seconds(lambda: train_heads(*args, PAPER_SWEEP, epochs=epochs, **HEAD))
    depth_one = [setting for setting in PAPER_SWEEP if setting["depth"] == 1]
    shallow = _seconds(lambda: train_heads(*args, depth_one, epochs=epochs, **HEAD))
    by_head = sum(_seconds(lambda s=setting: train_head(*args, **s, epochs=epochs, **HEAD)) for setting in PAPER_SWEEP)
    return {"one_head_s": one, "ensemble_s": ensemble, "depth_one_s": shallow, "depth_one_heads": len(depth_one),
            "head_by_head_s": by_head}


def gate_ablation(epochs: int, classes: int = 4) -> dict:
    """Seconds of one gate, of the 5 gates x 3 seeds as one ensemble and of the 15 one by one."""
    generator = torch.Generator().manual_seed(0)

    def split(rows: int) -> GateData:
        labels = torch.randint(0, classes, (rows,), generator=generator)
        onehot = torch.nn.functional.one_hot(labels, classes).float()
        return GateData(vlm_pred=labels, vlm_signal=onehot, labels=labels,
                        head_logits=torch.randn(rows, classes, generator=generator) + onehot)

    train, val = split(GATE_ROWS), split(GATE_ROWS // 8)
    members = [(name, seed, train, val) for seed in GATE_SEEDS for name in GATES]
    settings = {"epochs": epochs, "lr": 1e-4, "batch_size": 1}
    one = _seconds(lambda: train_gate("concat_linear", classes, train, val, seed=0, **settings))
    ensemble = _seconds(lambda: train_gates(members, classes, **settings))
    by_gate = sum(_seconds(lambda m=member: train_gate(m[0], classes, train, val, seed=m[1], **settings))
                  for member in members)
    return {"gates": len(members), "one_gate_s": one, "ensemble_s": ensemble, "gate_by_gate_s": by_gate}


def cached_tensors(output_dir: Path, images: Path) -> tuple[dict, dict, dict]:
    """Stage 2's cached features and teacher logits of the toy world, with the labels."""
    cache = output_dir / "toy" / "distill" / "cache"
    splits = load_dataset(images, "toy", output_dir)
    features = {split: torch.load(cache / f"vlm_features_{split}.pt", weights_only=True)["values"]
                for split in ("train", "val")}
    teacher = {split: torch.load(cache / f"teacher_logits_{split}.pt", weights_only=True)["values"]
               for split in features}
    labels = {split: torch.tensor([s.label for s in splits.split(split)]) for split in features}
    return features, teacher, labels


def wide_tensors(classes: int = 4) -> tuple[dict, dict, dict]:
    generator = torch.Generator().manual_seed(0)
    rows = {"train": WIDE_ROWS, "val": 50}
    return ({split: torch.randn(n, WIDE_DIM, generator=generator) for split, n in rows.items()},
            {split: torch.randn(n, classes, generator=generator) for split, n in rows.items()},
            {split: torch.randint(0, classes, (n,), generator=generator) for split, n in rows.items()})


def run() -> dict:
    """Wall times (s) of one cold head run and of the warm 5 x 5 grid, and of the paper's sweep at
    batch 1 beside one head and head by head; their ratios."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images, vlm, teacher = warm_world(root)
        one_run = stage_seconds(images, vlm, teacher, root / "outputs")
        grid = stage_seconds(images, vlm, teacher, root / "outputs", "--depth", *DEPTHS, "--alpha", *ALPHAS)
        kept = len(list((root / "outputs" / "toy" / "distill" / "runs").glob("*/meta.json")))
        toy = cached_tensors(root / "outputs", images)
    paper = paper_sweep(*toy, PAPER_EPOCHS)
    gates = gate_ablation(PAPER_EPOCHS)
    wide = paper_sweep(*wide_tensors(), PAPER_EPOCHS)
    ratio = grid / one_run
    paper_ratio = paper["ensemble_s"] / paper["one_head_s"]
    result = {"heads": len(DEPTHS) * len(ALPHAS), "kept_runs": kept, "head_epochs": EPOCHS,
              "one_run_s": round(one_run, 2), "grid_s": round(grid, 2), "grid_over_one_run": round(ratio, 3),
              "grid_over_separate": round(grid / (len(DEPTHS) * len(ALPHAS) * one_run), 3),
              "paper_sweep_heads": len(PAPER_SWEEP), "paper_train_rows": len(toy[0]["train"]),
              "paper_epochs": PAPER_EPOCHS,
              "paper_one_head_s": round(paper["one_head_s"], 2), "paper_ensemble_s": round(paper["ensemble_s"], 2),
              "paper_head_by_head_s": round(paper["head_by_head_s"], 2),
              "paper_ensemble_over_one_head": round(paper_ratio, 3),
              "paper_head_by_head_over_one_head": round(paper["head_by_head_s"] / paper["one_head_s"], 3),
              "paper_depth1_heads": paper["depth_one_heads"],
              "paper_depth1_ensemble_over_one_head": round(paper["depth_one_s"] / paper["one_head_s"], 3),
              "gate_ablation_gates": gates["gates"], "gate_train_rows": GATE_ROWS,
              "gate_ensemble_over_one_gate": round(gates["ensemble_s"] / gates["one_gate_s"], 3),
              "gate_by_gate_over_one_gate": round(gates["gate_by_gate_s"] / gates["one_gate_s"], 3),
              "paper_3584d_train_rows": WIDE_ROWS,
              "paper_3584d_ensemble_over_one_head": round(wide["ensemble_s"] / wide["one_head_s"], 3),
              "paper_3584d_head_by_head_over_one_head": round(wide["head_by_head_s"] / wide["one_head_s"], 3),
              "paper_3584d_depth1_ensemble_over_one_head": round(wide["depth_one_s"] / wide["one_head_s"], 3),
              TARGETS_KEY: [
                  target_row("5 x 5 depth x alpha grid on cached features / one head run (features computed)",
                             ratio, "<=", TARGET),
                  target_row(f"paper's ablation sweep ({len(PAPER_SWEEP)} heads) at batch 1 as one ensemble, "
                             "cached 64-d features / one head", paper_ratio, "<=", PAPER_TARGET)]}
    print_results(result)
    return result


if __name__ == "__main__":
    run()
