#!/usr/bin/env bash
# Builds (here, without a GPU) and packs what scripts/gpu-check.sh needs on a lent GPU machine,
# which has no cargo and no network: the CUDA builds of `xtask`, `ctxalign` and the `pretrain`
# example (stripped, xz-compressed) and the runtime-library setup, into .gpu/ (git-ignored).
#
#   scripts/gpu-pack.sh          then run on the GPU machine, from the repository root, carrying .gpu:
#   bash scripts/gpu-check.sh    (results: $OUT/gpu-check.json and $OUT/gpu-check.log)
#
# With the device tool: run(command="bash scripts/gpu-check.sh", carry=[".gpu"], timeout_s=540).
# What travels must stay under 64 MiB: the tracked tree (~19 MiB) plus .gpu (~30 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/cuda-check.sh
bin=${CARGO_TARGET_DIR:-$PWD/target/cuda}/release
rm -rf .gpu
mkdir -p .gpu/bin
for b in "$bin/xtask" "$bin/ctxalign" "$bin/examples/pretrain"; do
  name=$(basename "$b")
  strip -o ".gpu/bin/$name" "$b"
  xz -T2 -6 -f ".gpu/bin/$name"
done
cp ../shared/tools/device-env.sh .gpu/device-env.sh
git rev-parse HEAD > .gpu/commit 2>/dev/null || true
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
packed=$(du -cb .gpu | tail -1 | cut -f1)
total=$(( (tree + packed) / 1048576 ))
echo "gpu-pack: .gpu holds $(( packed / 1048576 )) MiB; with the tree $total MiB of the 64 MiB that travel"
(( total < 62 )) || { echo "gpu-pack: too large to travel" >&2; exit 1; }
