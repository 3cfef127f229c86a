#!/usr/bin/env bash
# Builds NCCL's library for Hopper only (sm_90), with the nvcc 13.0 of scripts/cuda-build.sh's
# Python environment, into .nccl/ (git-ignored), for a lent GPU machine whose own NCCL is older than
# 2.30: two ranks on one GPU (the single-GPU data-parallel check) need NCCL ≥ 2.30 and
# NCCL_MULTI_RANK_GPU_ENABLE=1. The nvidia-nccl-cu13 wheel's library carries every architecture
# (190 MB, incompressible): too large to travel. One architecture, and only the kernels ctxalign's
# communicator launches (all-gather, broadcast, send/receive, all-reduce sum / max / average of f32
# and f64: NCCL's ONLY_FUNCS), is 5 MB compressed.
#
#   scripts/build-nccl.sh /path/to/nccl        # a checkout of github.com/NVIDIA/nccl at v2.30 or later
#
# About 35 minutes on 2 cores. scripts/gpu-dist-check.sh uses .nccl/ when it travels (carry ".nccl").
set -euo pipefail
src=${1:?usage: scripts/build-nccl.sh NCCL_SOURCE_DIR}
cd "$(dirname "$0")/.."
repo=$PWD
home=${CTX_CUDA_HOME:-$HOME/.cache/ctx-cuda}
[[ -x $home/venv/bin/python ]] || bash scripts/cuda-build.sh --version >/dev/null
cu=$("$home/venv/bin/python" -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13'))")
[[ -e $cu/lib64 ]] || ln -s "$cu/lib" "$cu/lib64"   # NCCL's makefiles look for lib64
# Average is NCCL's PreMulSum for floats; Max its MinMax; every half-precision reduction is lifted
# to f32 by the communicator first.
only='AllGather * *|Broadcast * *|SendRecv|AllReduce (Sum|MinMax|PreMulSum) (f32|f64) * *'
(cd "$src" && make -j"$(nproc)" src.build CUDA_HOME="$cu" NVCC_GENCODE="-gencode=arch=compute_90,code=sm_90" ONLY_FUNCS="$only")
mkdir -p "$repo/.nccl"
lib=$(ls "$src"/build/lib/libnccl.so.2.* | head -1)
strip -o "$repo/.nccl/libnccl.so.2" "$lib"
xz -T0 -6 -f "$repo/.nccl/libnccl.so.2"
ls -la "$repo/.nccl"
