#!/usr/bin/env bash
# Build the workspace with Candle's CUDA backend on a machine that has no CUDA toolkit and no GPU.
#
#   scripts/cuda-build.sh [cargo args...]     e.g.  scripts/cuda-build.sh build --release --features cuda --example pretrain
#
# What it does:
#  1. installs nvcc 13.0 and the CUDA headers/libraries from PyPI into a venv (~1.2 GB, once, cached in $CTX_CUDA_HOME)
#  2. makes link stubs: lib*.so symlinks to the versioned libraries, and a libcuda.so stub (soname libcuda.so.1)
#     holding every cu* driver symbol that cudarc references; at run time the real driver's libcuda.so.1 is used
#  3. runs cargo with CUDA_COMPUTE_CAP=90 (H100/H200) and CUDARC_CUDA_VERSION=13000
#
# Why 13.0: the H100/H200 machines this project runs on have driver 580 (CUDA 13.0). Candle's kernels ship as PTX that the driver JIT-compiles,
# and a driver rejects PTX from a newer toolkit than its own. Override with CTX_NVCC_VERSION / CTX_CUDA_RUNTIME_VERSION.
#
# At run time on the GPU machine the binary needs libcublas.so.13, libcublasLt.so.13, libcurand.so.10, libcudart.so.13:
# source device-env.sh (beside this file) there first.
set -euo pipefail
home=${CTX_CUDA_HOME:-$HOME/.cache/ctx-cuda}
nvcc_v=${CTX_NVCC_VERSION:-13.0.88}
rt_v=${CTX_CUDA_RUNTIME_VERSION:-13.0.96}
venv=$home/venv
if [[ ! -x $venv/bin/python ]]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import importlib.metadata as m; assert m.version('nvidia-nvvm') == '$nvcc_v'" 2>/dev/null; then
  # nvcc's own pieces (nvvm's cicc, crt headers) must be the same release as ptxas, or the PTX version won't match
  "$venv/bin/pip" install -q "nvidia-cuda-nvcc==$nvcc_v" "nvidia-nvvm==$nvcc_v" "nvidia-cuda-crt==$nvcc_v" \
    "nvidia-cuda-runtime==$rt_v" "nvidia-cuda-cccl==13.0.*" "nvidia-cublas==13.0.*" "nvidia-curand" "nvidia-cuda-nvrtc==13.0.*"
fi
cu=$("$venv/bin/python" -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13'))")
stub=$home/stubs
mkdir -p "$stub"
for l in cublas cublasLt curand cudart nvrtc; do
  f=$(ls "$cu"/lib/lib$l.so.* | head -1)
  ln -sf "$f" "$stub/lib$l.so"
done
if [[ ! -f $stub/libcuda.so ]]; then
  # every driver-API entry point cudarc may call; a stub body is fine because the real driver replaces it at run time
  syms=$(strings -a "$cu"/include/cuda.h | grep -oE '\bcu[A-Z][A-Za-z0-9_]+\b' | sort -u)
  { for s in $syms; do echo "void $s(void) {}"; done; } > "$stub/cuda_stub.c"
  gcc -shared -fPIC -o "$stub/libcuda.so" -Wl,-soname,libcuda.so.1 "$stub/cuda_stub.c"
fi
export PATH=$cu/bin:$PATH CUDA_ROOT=$cu CUDA_PATH=$cu CUDA_TOOLKIT_ROOT_DIR=$cu
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000}
export RUSTFLAGS="${RUSTFLAGS:-} -L $stub"
exec cargo "$@"
