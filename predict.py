"""Batch prediction: the trained EmoVLM-KD (stages 1-3) on every image of a folder.

    python predict.py --dataname emoset --images photos/ --out predictions.jsonl
    python predict.py --dataname emoset --images photos/ --out predictions.csv --explain
    torchrun --nproc_per_node 8 predict.py --dataname emoset --images photos/ --out predictions.jsonl

Loads <output_dir>/<dataname>/{vlm,distill,gate} (as demo.py does) and writes one record per
image found under --images (recursively; .jpg .jpeg .png .webp .bmp .gif): the final label and
probabilities, the VLM's answer and probabilities, the distilled head's probabilities and, for
gates that expose them, the gate's source weights; --explain adds the generated key elements
and reasoning. Rerun the same command to resume: images already in --out are skipped.
"""
import sys

from engine.stages.predict import main
from utils.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
