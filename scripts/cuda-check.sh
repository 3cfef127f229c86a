#!/usr/bin/env bash
# Compiles the whole workspace — every crate, binary, example, test and benchmark — with Candle's
# CUDA backend and NCCL (`--features cuda,nccl`), on a machine without a GPU, a CUDA toolkit or
# NCCL, through scripts/cuda-build.sh (nvcc 13.0 from PyPI, link stubs,
# CUDA_COMPUTE_CAP=90 for H100/H200) and scripts/nccl-env.sh (NCCL from the nvidia-nccl-cu13 wheel).
#
#   scripts/cuda-check.sh            # check: build all targets (≈ 15–25 min cold on 2 cores)
#   scripts/cuda-check.sh --no-run   # the same, test binaries included (what gpu-pack.sh needs)
#
# Builds go to target/cuda (their RUSTFLAGS differ from the CPU build's, so sharing target/ would
# rebuild everything each time one or the other runs).
set -euo pipefail
cd "$(dirname "$0")/.."
build=scripts/cuda-build.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/cuda}
# shellcheck source=scripts/nccl-env.sh
source scripts/nccl-env.sh
features="ctxalign/cuda,ctxalign/nccl,ctxalign-cli/cuda,ctxalign-cli/nccl,xtask/cuda,xtask/nccl,ctxalign-train/cuda,ctxalign-train/nccl,ctxalign-models/cuda,ctxalign-nn/cuda"
start=$(date +%s)
bash "$build" build --release --workspace --all-targets --features "$features"
if [[ ${1:-} == --no-run ]]; then
  bash "$build" test --release --workspace --features "$features" --no-run
fi
echo "cuda-check: the workspace compiles with --features cuda,nccl ($(( $(date +%s) - start )) s; binaries in $CARGO_TARGET_DIR/release)"
