#!/usr/bin/env bash
# The prepared data-parallel check for a lent GPU machine (one H100/H200 is enough: NCCL ≥ 2.30 runs
# two ranks on one GPU with NCCL_MULTI_RANK_GPU_ENABLE=1). Run from the repository root with the
# .gpu/ folder from scripts/gpu-pack.sh carried along; every figure goes into
# $OUT/gpu-dist-check.json and the whole log into $OUT/gpu-dist-check.log. Budget ≈ 6–8 minutes.
#
#  1. NCCL: its version, then every collective on 2 ranks (processes, NCCL) against its closed form
#     (`xtask dist-check`), and the timeout: with rank 1 silent, rank 0 must end with an error
#     within --dist-timeout (`--hang-rank 1`, exit status 3 when it does);
#  2. the equivalence of the CPU tests, on the GPU through NCCL: S0 and ContextCLIP on 2 ranks ×
#     batch b against 1 rank × 2b (the `ctxalign` jobs themselves, --nproc-per-node 2 on cuda:0),
#     every loss term and every weight compared (scripts/compare_runs.py);
#  3. the all-reduce's bandwidth against buffer size and S0's gradients in the loop's buckets
#     (`xtask bench allreduce`);
#  4. the S0 step at BLIP-base (batch 32, bf16 then f32) on 1 rank, on 2 ranks × 16 (the gradient
#     all-reduce's share of the step), and PyTorch's step on the same GPU, with peak memory;
#  5. with PROFILE=1, scripts/gpu-profile.sh (the S0 step's kernels, ours and PyTorch's).
#
#   run(command="bash scripts/gpu-dist-check.sh", carry=[".gpu"], timeout_s=590)
#
# ONLY='<regex>' runs the steps whose names match; DEADLINE_S (default 540) bounds the whole.
# Dry run of its CPU half here (threads instead of NCCL): DEVICE=cpu BIN=target/release
#   ONLY='^(collectives|hang|s0-|cc-|compare|allreduce)' bash scripts/gpu-dist-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-target/gpu-dist-check}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda:0}
torch_device=${DEVICE}
DEADLINE_S=${DEADLINE_S:-540}
S0_BATCH=${S0_BATCH:-32}
mkdir -p "$OUT"
started=$(date +%s)
work=${WORK:-/tmp/ctxalign-gpu-dist}
rm -rf "$work"; mkdir -p "$work/parts"
log=$OUT/gpu-dist-check.log
: > "$log"
say() { echo "== $*" | tee -a "$log"; }
# shellcheck source=scripts/gpu-unpack.sh
source scripts/gpu-unpack.sh
# shellcheck source=scripts/gpu-steps.sh
source scripts/gpu-steps.sh
XTASK=$BIN/xtask
# The user jobs through xtask's aliases: one binary travels.
CTXALIGN=$BIN/xtask
# NCCL from the machine's Python packages (the nvidia-nccl-cu13 wheel), unless .nccl/ carries one:
# two ranks on one GPU need NCCL ≥ 2.30 (scripts/build-nccl.sh builds 2.30 for sm_90 only, small
# enough to travel, where the machine's wheel is older).
nccl_lib=$("$PY" -c "import nvidia.nccl, os; print(os.path.join(nvidia.nccl.__path__[0], 'lib'))" 2>/dev/null)
if [[ -d .nccl ]]; then
  mkdir -p "$work/nccl"
  for f in .nccl/*; do
    case $f in
      *.xz) "$PY" -c "import lzma,sys,shutil; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$f" "$work/nccl/$(basename "$f" .xz)" ;;
      *) cp "$f" "$work/nccl/" ;;
    esac
  done
  nccl_lib=$work/nccl
fi
export LD_LIBRARY_PATH="${nccl_lib:+$nccl_lib:}${LD_LIBRARY_PATH:-}"
export CTXALIGN_HOME=$work/home
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$work/gpu.csv" 2>/dev/null || echo none > "$work/gpu.csv"
{ echo "NCCL used: $nccl_lib"; ls -la "$nccl_lib" 2>&1; "$PY" -c "import torch; print('PyTorch NCCL', '.'.join(map(str, torch.cuda.nccl.version())))" 2>&1; } > "$work/nccl.txt"
cat "$work/gpu.csv" "$work/nccl.txt" | tee -a "$log"

# 1. The collectives, and a silent rank.
step collectives 90 "$XTASK" dist-check --device "$DEVICE" --nproc-per-node 2 --json "$work/parts/collectives.json"
step hang 90 "$XTASK" dist-check --device "$DEVICE" --nproc-per-node 2 --hang-rank 1 --dist-timeout 8

# 2. W ranks × b against 1 rank × W·b, through the jobs users run.
data=(--data-dir "$work/vignettes")
s0=(pretrain --device "$DEVICE" --steps 8 --warmup-steps 2 --seed 3 "${data[@]}")
step s0-1x8 150 "$CTXALIGN" "${s0[@]}" --batch-size 8 --out "$work/s0-1x8"
step s0-2x4 120 "$CTXALIGN" "${s0[@]}" --batch-size 4 --nproc-per-node 2 --out "$work/s0-2x4"
cc=(train-contextclip --device "$DEVICE" --steps 8 --seed 9 --no-eval "${data[@]}")
step cc-1x16 90 "$CTXALIGN" "${cc[@]}" --batch-size 16 --out "$work/cc-1x16"
step cc-2x8 90 "$CTXALIGN" "${cc[@]}" --batch-size 8 --nproc-per-node 2 --out "$work/cc-2x8"
step compare 60 "$PY" scripts/compare_runs.py --json "$work/parts/equivalence.json" \
  s0 "$work/s0-1x8" "$work/s0-2x4" contextblip.safetensors itm,tmim,grad_norm \
  contextclip "$work/cc-1x16" "$work/cc-2x8" model.safetensors clip,cx,grad_norm

# 3. Bandwidth.
step allreduce 90 "$XTASK" bench allreduce --device "$DEVICE" --nproc-per-node 2 --out "$work/parts" --bucket-mb "${BUCKET_MB:-25,64,256}"

# 4. The S0 step at BLIP-base: ours on 1 and on 2 ranks, PyTorch's, bf16 then f32.
for dt in bf16 f32; do
  step "s0-x1-$dt" 120 "$XTASK" bench s0-step --device "$DEVICE" --precision "$dt" --batch "$S0_BATCH" --steps 5 \
    --cache "$work/blip-base" --out "$work/parts"
  step "s0-x2-$dt" 120 "$XTASK" bench s0-step --device "$DEVICE" --precision "$dt" --batch $(( S0_BATCH / 2 )) --steps 5 \
    --nproc-per-node 2 --cache "$work/blip-base" --out "$work/parts"
  step "s0-torch-$dt" 120 "$PY" xtask/bench_s0_torch.py --device "$torch_device" --dtype "$dt" --batch "$S0_BATCH" --steps 5 \
    --ours "$work/parts/s0_step-${DEVICE/:/}-$dt.json" --out "$work/parts/s0-torch-$dt.json"
done
# 5. Optionally (PROFILE=1), where the S0 step's GPU time goes, kernel by kernel, ours beside
#    PyTorch's (scripts/gpu-profile.sh: ncu and torch.profiler), into $OUT.
if [[ ${PROFILE:-0} == 1 ]]; then
  step profile 300 env BIN="$BIN" OUT="$OUT" WORK="$work/profile" bash scripts/gpu-profile.sh
fi
rm -rf "$work/blip-base"
for run in s0-2x4 cc-2x8; do
  [[ -f $work/$run/training.json ]] && cp "$work/$run/training.json" "$work/parts/$run-training.json"
done
collect_json "$OUT/gpu-dist-check.json" '{"hang": 3}'
