"""Stage 1: instruction-tune a Qwen2-VL-style model with LoRA/QLoRA, then evaluate it as a classifier.

Reads stage 0's ``annotations_train.jsonl``, trains on the categorical conversation of every
training image and the observation and reasoning ones where stage 0 wrote text (counts printed
and recorded in run.json and meta.json), with the loss on the answers only, and
writes the adapter, processor, log and ``meta.json`` to ``<output_dir>/<dataname>/vlm/``.

    python train_vlm.py --dataname emoset --gpu 0                       # paper settings (QLoRA on a GPU)
    torchrun --nproc_per_node 4 train_vlm.py --dataname emoset          # data-parallel (or accelerate launch)
    python train_vlm.py --dataname toy --vlm_model checkpoints/tiny-qwen2-vl --config configs/toy_vlm.yaml
    python train_vlm.py --dataname emoset --eval_only --eval_mode generate
"""
import sys

from engine.stages.vlm import main
from utils.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
