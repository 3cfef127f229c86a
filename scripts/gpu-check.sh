#!/usr/bin/env bash
# The prepared check for a lent GPU machine (H100/H200; nvcc, python3 with torch and transformers;
# no cargo, no network). Run from the repository root with the .gpu/ folder made by
# scripts/gpu-pack.sh carried along. Every figure goes into one JSON, $OUT/gpu-check.json, and the
# whole log into $OUT/gpu-check.log. Each step has its own time limit; a failed step is recorded
# and the next one runs. Budget: ≈ 6–8 minutes on an H100.
#
#  1. the fixture runner on the device in f32 (≤ 1e-4), bf16 and f16 (relative tolerances);
#  2. gradient reach of every trainable model, f32 and bf16;
#  3. `bench itm` (224 / 384 px) and `bench s0-step` (BLIP-base, batch $S0_BATCH at 224) next to
#     the same workloads in PyTorch on the same GPU, f32 and bf16, with peak GPU memory;
#  4. a real run: S0 on the built-in data ($S0_STEPS steps, bf16) then zero-shot on the built-in
#     valid split, each timed end to end.
#
# The whole script keeps to DEADLINE_S seconds (default 480, under a 540 s call): each step's limit is
# cut to what is left, and a step with under 15 s left is recorded as skipped, so the JSON is always
# written. The steps run in order of importance: parity and gradients, the bf16 benchmarks (the
# goals), the real run, then the f32 benchmarks.
#
# ONLY='^s0-(ctxalign|torch)' runs only the steps whose names match.
#
# Dry run of the CPU half here (no GPU, the CPU build, PyTorch if installed):
#   DEVICE=cpu BIN=target/release QUICK=1 OUT=/tmp/gpu-dry bash scripts/gpu-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-target/gpu-check}
QUICK=${QUICK:-0}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
DEADLINE_S=${DEADLINE_S:-480}
started=$(date +%s)
work=${WORK:-/tmp/ctxalign-gpu-check}
rm -rf "$work"; mkdir -p "$work/parts"
log=$OUT/gpu-check.log
: > "$log"
say() { echo "== $*" | tee -a "$log"; }

# shellcheck source=scripts/gpu-unpack.sh
source scripts/gpu-unpack.sh
XTASK=$BIN/xtask
PRETRAIN=$BIN/pretrain
[[ -x $PRETRAIN ]] || PRETRAIN=$BIN/examples/pretrain

if [[ $QUICK == 1 ]]; then
  ITM_SIZES=${ITM_SIZES:-224}; ITM_SETS=${ITM_SETS:-1}; S0_BATCH=${S0_BATCH:-2}; S0_BENCH_STEPS=${S0_BENCH_STEPS:-1}
  S0_STEPS=${S0_STEPS:-3}; S0_RUN_BATCH=${S0_RUN_BATCH:-8}
else
  ITM_SIZES=${ITM_SIZES:-224,384}; ITM_SETS=${ITM_SETS:-10}; S0_BATCH=${S0_BATCH:-32}; S0_BENCH_STEPS=${S0_BENCH_STEPS:-5}
  S0_STEPS=${S0_STEPS:-300}; S0_RUN_BATCH=${S0_RUN_BATCH:-32}
fi
torch_device=$DEVICE; [[ $DEVICE == cuda ]] && torch_device=cuda:0
ours_device=${DEVICE/:/}; [[ $DEVICE == cuda ]] && ours_device=cuda0

# shellcheck source=scripts/gpu-steps.sh
source scripts/gpu-steps.sh

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$work/gpu.csv" 2>/dev/null || echo "none" > "$work/gpu.csv"
cat "$work/gpu.csv" >> "$log"

FIX="tests/fixtures/blip_itm_tiny tests/fixtures/blip_itm_interp tests/fixtures/contextblip_adapter_tiny tests/fixtures/clip_tiny tests/fixtures/clip_eos_interp tests/fixtures/bert_tiny tests/fixtures/resnet_tiny tests/fixtures/resnet_basic_odd tests/fixtures/contextual_loss tests/fixtures/preprocess"
for dt in f32 bf16 f16; do
  # shellcheck disable=SC2086
  step "parity-$dt" 60 "$XTASK" parity --device "$DEVICE" --dtype "$dt" $FIX --json "$work/parts/parity-$dt.json"
done
for p in f32 bf16; do
  step "grad-$p" 60 "$XTASK" grad-check --device "$DEVICE" --precision "$p" --json "$work/parts/grad-$p.json"
done
# bench DTYPE: ITM inference and the S0 training step, ours then PyTorch's on the same device.
bench() {
  local dt=$1
  step "itm-ctxalign-$dt" 120 "$XTASK" bench itm --device "$DEVICE" --dtype "$dt" --sizes "$ITM_SIZES" --sets "$ITM_SETS" --out "$work/parts"
  step "itm-torch-$dt" 120 "$PY" xtask/bench_itm_torch.py --device "$torch_device" --dtype "$dt" --sizes "$ITM_SIZES" --sets "$ITM_SETS" \
    --ours "$work/parts/itm-$ours_device-$dt.json" --out "$work/parts/itm-torch-$dt.json"
  step "s0-ctxalign-$dt" 120 "$XTASK" bench s0-step --device "$DEVICE" --precision "$dt" --batch "$S0_BATCH" --steps "$S0_BENCH_STEPS" \
    --cache "$work/blip-base" --out "$work/parts"
  step "s0-torch-$dt" 120 "$PY" xtask/bench_s0_torch.py --device "$torch_device" --dtype "$dt" --batch "$S0_BATCH" --steps "$S0_BENCH_STEPS" \
    --ours "$work/parts/s0_step-$ours_device-$dt.json" --out "$work/parts/s0-torch-$dt.json"
}
bench bf16
# The binaries were built elsewhere: name the shipped model by its path in this checkout.
MODEL=models/blip-vignettes-small
step "s0-run" 150 "$PRETRAIN" --model "$MODEL" --device "$DEVICE" --precision bf16 --steps "$S0_STEPS" --batch-size "$S0_RUN_BATCH" \
  --data-dir "$work/vignettes" --out "$work/s0"
step "zero-shot" 60 "$XTASK" zero-shot --model "$MODEL" --contextblip "$work/s0" --device "$DEVICE" --dtype bf16 \
  --data-dir "$work/vignettes" --out "$work/parts/zero-shot.json"
bench f32
rm -rf "$work/blip-base"

# One JSON of everything (with the S0 run's record).
[[ -f $work/s0/training.json ]] && cp "$work/s0/training.json" "$work/parts/s0-run-training.json"
collect_json "$OUT/gpu-check.json"
