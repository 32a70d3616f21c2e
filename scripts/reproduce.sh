#!/usr/bin/env bash
# The EmoVLM-KD pipeline on a real dataset with the paper's settings (the stages' defaults, and
# configs/paper_gate.yaml for stage 3, whose VLM input is the decoded answer as in the paper;
# configs/paper_*.yaml list every setting with its source). Stages 1-3 want a CUDA GPU.
#
#   export OPENAI_API_KEY=...                                  # stage 0 on OpenAI (gpt-4o) ...
#   bash scripts/reproduce.sh FI                               # = make reproduce DATA=FI
#   BASE_URL=http://localhost:8000/v1 MODEL=Qwen/Qwen2-VL-72B-Instruct bash scripts/reproduce.sh FI
#                                                              # ... or any OpenAI-compatible server
#   bash scripts/reproduce.sh FI --gpu 1 --seed 0              # extra flags go to every stage script
#   NPROC=4 bash scripts/reproduce.sh FI                       # stages 1 and 2 data-parallel (torchrun)
#
# Environment: PY (python), DATA_ROOT (images), OUT (outputs), NPROC (1), BASE_URL, MODEL.
# Extra flags must be ones every stage takes (the shared ones: --seed, --gpu, --num_workers,
# --skip_bad_images); set the data and output folders with DATA_ROOT and OUT. Stage 0 resumes
# where it stopped when rerun; the later stages start over.
#
# Lay the dataset out first with `python -m data.prepare` (docs/reproducing.md, section 1). As the
# reference splits them, its recipes write EmoSet, Emotion6, Abstract and ArtPhoto as train/ and
# test/ only (`data.prepare emoset --official_val` writes EmoSet's val.json as val/ instead); with
# no val/ folder the dataset check below carves 10% of train/ per class (seed 42) as validation
# and saves it in $OUT/<dataname>/split.json, which every stage then uses and which records where
# validation came from.
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: bash scripts/reproduce.sh <dataname> [shared stage flags ...]  (e.g. FI, emoset)"
if [ $# -lt 1 ] || [[ $1 == -* ]]; then echo "$usage" >&2; exit 2; fi
DATA=$1; shift
PY=${PY:-python}
DATA_ROOT=${DATA_ROOT:-images}
OUT=${OUT:-outputs}
NPROC=${NPROC:-1}
if ! [[ $NPROC =~ ^[1-9][0-9]*$ ]]; then
  echo "NPROC=$NPROC: expected a number of processes (GPUs) for stages 1 and 2, e.g. NPROC=4" >&2; exit 2
fi
COMMON=(--dataname "$DATA" --data_root "$DATA_ROOT" --output_dir "$OUT" "$@")
STAGE0=()
if [ -n "${BASE_URL:-}" ]; then STAGE0+=(--base_url "$BASE_URL"); fi
if [ -n "${MODEL:-}" ]; then STAGE0+=(--model "$MODEL"); fi
# Data-parallel stages go through torchrun of the same interpreter as everything else.
LAUNCH=("$PY")
if [ "$NPROC" -gt 1 ]; then LAUNCH=("$PY" -m torch.distributed.run --nproc_per_node "$NPROC"); fi

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
start=$(date +%s)

step "dataset check: $DATA_ROOT/$DATA (classes, split sizes, validation carved from train/ when there is no val/, every image decoded once)"
"$PY" -m data "${COMMON[@]}"

step "stage 0: instruction data from ${MODEL:-the default API model} at ${BASE_URL:-OpenAI}"
"$PY" generate_instructions.py "${COMMON[@]}" "${STAGE0[@]}"

step "stage 1: QLoRA instruction tuning of the VLM ($NPROC process(es))"
"${LAUNCH[@]}" train_vlm.py "${COMMON[@]}"

step "stage 2: ViT teacher and distilled head ($NPROC process(es))"
"${LAUNCH[@]}" train_distillation.py "${COMMON[@]}"

step "stage 3: every gate variant on the VLM's decoded answers, read strictly (configs/paper_gate.yaml, --gate all)"
"$PY" train_gate.py "${COMMON[@]}" --config configs/paper_gate.yaml --parser strict --gate all

step "results (python -m utils.report)"
"$PY" -m utils.report --output_dir "$OUT" --datasets "$DATA"
"$PY" -m utils.report --output_dir "$OUT" --table main   # every dataset run so far; $OUT/tables/main.md, main.csv
echo "reproduction of $DATA finished in $(( $(date +%s) - start )) s"
