"""Stage 3: train the gate that fuses the VLM's answer with the distilled head's logits.

Reads stage 1 (``<output_dir>/<dataname>/vlm/``) and stage 2 (``.../distill/``, ``.../teacher/``),
computes both frozen inputs once per image (cached), trains the gate on those tensors, keeps
the best epoch on validation and writes ``gate.pt``, ``metrics.json``, ``table.md`` and the
pictures to ``<output_dir>/<dataname>/gate/``.

    python train_gate.py --dataname emoset --gpu 0                 # the paper's gate: concat + linear
    python train_gate.py --dataname emoset --gate all              # the ablation: every variant, one table
    python train_gate.py --dataname emoset --gate_train_split val  # fit on validation: the VLM saw the train images
    python train_gate.py --dataname emoset --gate all --seeds 0 1 2   # each variant once per seed
    python train_gate.py --dataname emoset --head depth=2,alpha=0.5    # fuse another head of a stage-2 sweep
    python train_gate.py --dataname toy --vlm_model checkpoints/tiny-qwen2-vl --config configs/toy_gate.yaml
    torchrun --nproc_per_node 8 train_gate.py --dataname emoset    # VLM answers sharded; the gate trains on rank 0

With ``--gate all`` every variant is saved as ``gate_<name>.pt`` and the one best on validation
(ties: the earlier in the table, concat_linear first) also as ``gate.pt``, which the demo loads.
Every seed's outputs are also kept in ``gate/runs/<head run>/seed=<seed>/``; the top-level
``gate/`` holds the first seed's, and only when the fused head is stage 2's default head.
"""
import sys

from engine.stages.gate import main
from utils.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
