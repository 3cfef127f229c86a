#!/usr/bin/env bash
# Builds (here, without a GPU) and packs what the GPU scripts (scripts/gpu-check.sh,
# gpu-dist-check.sh, gpu-profile.sh) need on a lent GPU machine, which has no cargo and no network:
# the CUDA + NCCL builds of `xtask`, `ctxalign` and the `pretrain` example (stripped,
# xz-compressed) and the runtime-library setup, into .gpu/ (git-ignored).
#
#   scripts/gpu-pack.sh               (BINS="xtask ctxalign" packs those two only)
#                                     then run on the GPU machine, from the repository root, carrying .gpu:
#   bash scripts/gpu-dist-check.sh    (results: $OUT/gpu-dist-check.json and its log)
#
# With the device tool: run(command="bash scripts/gpu-dist-check.sh", carry=[".gpu"], timeout_s=590).
# What travels must stay under 64 MiB: the tracked tree (~19 MiB) plus .gpu (~30 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/cuda}
# shellcheck source=scripts/nccl-env.sh
source scripts/nccl-env.sh
features="ctxalign/cuda,ctxalign/nccl,ctxalign-cli/cuda,ctxalign-cli/nccl,xtask/cuda,xtask/nccl,ctxalign-train/cuda,ctxalign-train/nccl,ctxalign-models/cuda,ctxalign-nn/cuda"
bash scripts/cuda-build.sh build --release -p xtask -p ctxalign-cli --bins --example pretrain --features "$features"
bin=$CARGO_TARGET_DIR/release
rm -rf .gpu
mkdir -p .gpu/bin
# BINS picks what travels (default all three; gpu-dist-check.sh needs xtask and ctxalign only).
for name in ${BINS:-xtask ctxalign pretrain}; do
  b=$bin/$name
  [[ $name == pretrain ]] && b=$bin/examples/pretrain
  name=$(basename "$b")
  strip -o ".gpu/bin/$name" "$b"
  xz -T2 -6 -f ".gpu/bin/$name"
done
cp scripts/device-env.sh .gpu/device-env.sh
git rev-parse HEAD > .gpu/commit 2>/dev/null || true
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
packed=$(du -cb .gpu | tail -1 | cut -f1)
total=$(( (tree + packed) / 1048576 ))
echo "gpu-pack: .gpu holds $(( packed / 1048576 )) MiB; with the tree $total MiB of the 64 MiB that travel"
(( total < 62 )) || { echo "gpu-pack: too large to travel" >&2; exit 1; }
