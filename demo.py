"""Gradio demo: every module's prediction for an uploaded image, side by side.

    python demo.py --dataname emoset                          # loads outputs/emoset/{vlm,distill,gate}
    python demo.py --dataname toy --vlm_model checkpoints/tiny-qwen2-vl --port 7860

Shows the instruction-tuned VLM (its answer, key elements and reasoning, class probabilities),
the distilled head's probabilities, and EmoVLM-KD's final prediction with the gate's source
weights where the gate type exposes them. Binds 127.0.0.1 unless --host says otherwise;
--share (a public Gradio link) is opt-in; analytics are off. The app lives in
engine/stages/demo.py, the prediction itself in engine/predict.py (it works without Gradio).
"""
import sys

from engine.stages.demo import main
from utils.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
