"""Stage 2: fine-tune the ViT teacher, then distil it into a small head on the VLM's frozen visual encoder.

Writes the teacher to ``<output_dir>/<dataname>/teacher/`` and the head, its metrics and the
feature cache to ``<output_dir>/<dataname>/distill/``. Needs stage 1's folder for its class
names and base VLM. A trained teacher for the same classes is reused; the frozen features and
teacher logits are computed once and cached.

    python train_distillation.py --dataname emoset --gpu 1
    python train_distillation.py --dataname emoset --teacher_checkpoint my_vit.pt   # reuse a teacher
    torchrun --nproc_per_node 4 train_distillation.py --dataname emoset   # features sharded (or accelerate launch)
    python train_distillation.py --dataname toy --vlm_model checkpoints/tiny-qwen2-vl --config configs/toy_distill.yaml
"""
import sys

from engine.stages.distill import main
from utils.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
