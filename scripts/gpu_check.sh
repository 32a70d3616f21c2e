#!/usr/bin/env bash
# The GPU-only code paths (docs/gpu.md) checked on a GPU machine in one go, offline, a few minutes:
#   bash scripts/gpu_check.sh            # PY=python, GPU=0, OUT=<a temporary folder> may be set
# 1. the tests marked `cuda` (tests/test_cuda.py: placement, bf16, 4-bit loading, the fused
#    optimiser, stage 1 in bf16, the preflight's CUDA figures); without a GPU they are skipped;
# 2. the preflight on the toy world and the tiny VLM on this GPU (engine/preflight.py), whose table
#    and preflight.json are left under $OUT for docs/reproducing.md's table of measured results.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=${PY:-.venv/bin/python}; else PY=${PY:-python3}; fi
GPU=${GPU:-0}
OUT=${OUT:-$(mktemp -d)}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA GPU visible to $PY; nothing to check (the CPU suite is \`make test\`)" >&2
  exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
echo "== tests marked cuda"
CUDA_VISIBLE_DEVICES=$GPU "$PY" -m pytest tests/test_cuda.py -m cuda -q -p no:cacheprovider -rs
echo "== preflight on the toy world (tiny VLM) -> $OUT"
"$PY" -c "from data.toy import make_toy_dataset; from models.tiny import build_tiny_vlm; \
make_toy_dataset('$OUT/images/toy', num_classes=4, per_class=24, test_per_class=8, seed=0, size=64); \
build_tiny_vlm('$OUT/tiny-qwen2-vl', seed=0)" >/dev/null
"$PY" -m engine.preflight --dataname toy --data_root "$OUT/images" --output_dir "$OUT/outputs" \
  --vlm_model "$OUT/tiny-qwen2-vl" --gpu "$GPU" --num_workers 0 --quant none \
  --vlm_config configs/toy_vlm.yaml --distill_config configs/toy_distill.yaml --gate_config configs/toy_gate.yaml
echo "gpu_check: done; $OUT/outputs/toy/preflight/preflight.json holds the figures"
