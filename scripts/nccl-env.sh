# Sourced by scripts/cuda-check.sh: what a build with the `nccl` feature needs on a machine without
# NCCL installed. cudarc links `-lnccl`; the library comes from the nvidia-nccl-cu13 wheel, installed
# into the Python environment scripts/cuda-build.sh keeps (CTX_CUDA_HOME), whose
# libnccl.so.2 gets the unversioned `libnccl.so` link the linker looks for.
#
# At run time the binary loads libnccl.so.2 from LD_LIBRARY_PATH (scripts/gpu-env.sh on the GPU
# machine adds the wheel's folder there).
nccl_home=${CTX_CUDA_HOME:-$HOME/.cache/ctx-cuda}
nccl_py=$nccl_home/venv/bin/python
if [[ ! -x $nccl_py ]]; then
  # The environment is created by cuda-build.sh on its first run.
  bash "$(dirname "${BASH_SOURCE[0]}")/cuda-build.sh" --version >/dev/null
fi
if ! "$nccl_py" -c "import nvidia.nccl" 2>/dev/null; then
  "$nccl_home/venv/bin/pip" install -q "nvidia-nccl-cu13>=2.30"
fi
nccl_lib=$("$nccl_py" -c "import nvidia.nccl, os; print(os.path.join(nvidia.nccl.__path__[0], 'lib'))")
mkdir -p "$nccl_home/nccl-link"
ln -sf "$nccl_lib/libnccl.so.2" "$nccl_home/nccl-link/libnccl.so"
export RUSTFLAGS="${RUSTFLAGS:-} -L $nccl_home/nccl-link"
