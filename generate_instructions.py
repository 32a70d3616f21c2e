"""Stage 0: emotion instruction data (key elements + reasoning per training image) from a multimodal LLM.

    export OPENAI_API_KEY=...
    python generate_instructions.py --dataname emoset --data_root images
    python generate_instructions.py --dataname FI --base_url http://localhost:8000/v1 \\
        --model Qwen/Qwen2-VL-72B-Instruct            # any OpenAI-compatible server (vLLM, Ollama, ...)
    python generate_instructions.py --dataname toy --backend local \\
        --vlm_model checkpoints/tiny-qwen2-vl --accept_unstructured   # a local Hugging Face VLM
    torchrun --nproc_per_node 8 generate_instructions.py --dataname emoset --backend local \\
        --vlm_model Qwen/Qwen2-VL-72B-Instruct        # images sharded across 8 GPUs

Only training images are sent (the validation images split off train/ never are). Writes
<output_dir>/<dataname>/instructions/: annotations_train.jsonl (read by train_vlm.py),
rejected.jsonl (answers refused after --max_attempts, with the reason), meta.json, run.json.
Rerun the same command to resume: annotated images are skipped, rejected ones asked again
(unless --skip_rejected), failed requests retried.
"""
import sys

from engine.stages.instructions import main
from utils.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
