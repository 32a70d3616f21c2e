#!/usr/bin/env bash
# The whole EmoVLM-KD pipeline on the built-in toy world, CPU only, offline.
# Run through `make quickstart` (which creates .venv first) or directly with PY=<python>.
# ARCH picks the tiny backbone family: qwen2_vl (default), qwen2_5_vl, qwen3_vl, llava_onevision.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-toy}
CLASSES=${CLASSES:-4}
PER_CLASS=${PER_CLASS:-40}
TEST_PER_CLASS=${TEST_PER_CLASS:-20}
DATA_ROOT=${DATA_ROOT:-images}
OUT=${OUT:-outputs}
ARCH=${ARCH:-qwen2_vl}
VLM=${VLM:-checkpoints/tiny-${ARCH//_/-}}
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 GRADIO_ANALYTICS_ENABLED=False TOKENIZERS_PARALLELISM=false
# The tiny models' ops are too small to split across threads; on a busy 2-core machine several
# threads per op spin against each other (measured next to another torch process: 161 s instead
# of 62 s; idle: ~43 s either way).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
COMMON=(--dataname "$DATA" --data_root "$DATA_ROOT" --output_dir "$OUT")

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
start=$(date +%s)

step "toy dataset: $DATA_ROOT/$DATA ($CLASSES classes, $PER_CLASS train + $TEST_PER_CLASS test images each)"
if [ -d "$DATA_ROOT/$DATA" ]; then echo "exists, kept"; else
  "$PY" -m data.toy --out "$DATA_ROOT/$DATA" --num_classes "$CLASSES" --per_class "$PER_CLASS" \
    --test_per_class "$TEST_PER_CLASS" --seed 0
fi

step "tiny VLM ($ARCH): $VLM"
if [ -f "$VLM/config.json" ]; then echo "exists, kept"; else "$PY" -m models.tiny --arch "$ARCH" --out "$VLM"; fi

step "stage 0: instruction data from the local tiny VLM"
"$PY" generate_instructions.py "${COMMON[@]}" --backend local --vlm_model "$VLM" \
  --accept_unstructured --max_new_tokens 32

step "stage 1: LoRA instruction tuning of the VLM (configs/toy_vlm.yaml)"
"$PY" train_vlm.py "${COMMON[@]}" --vlm_model "$VLM" --config configs/toy_vlm.yaml

step "stage 2: ViT teacher and distilled head (configs/toy_distill.yaml)"
"$PY" train_distillation.py "${COMMON[@]}" --vlm_model "$VLM" --config configs/toy_distill.yaml

step "stage 3: the gate (configs/toy_gate.yaml)"
"$PY" train_gate.py "${COMMON[@]}" --vlm_model "$VLM" --config configs/toy_gate.yaml

step "results on the $DATA test split (python -m utils.report)"
"$PY" -m utils.report --output_dir "$OUT" --datasets "$DATA"
echo "quickstart finished in $(( $(date +%s) - start )) s; try the demo:"
echo "  $PY demo.py --dataname $DATA --vlm_model $VLM"
