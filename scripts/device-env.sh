# Source this on the GPU machine before running a binary built by cuda-build.sh:
#   source scripts/device-env.sh     (gpu-pack.sh copies it into .gpu/)
# It puts the CUDA 13 libraries that the machine's Python packages ship (cuBLAS, cuRAND, cudart) on LD_LIBRARY_PATH.
d=$(python3 - <<'PY'
import os, sys
import importlib.util
spec = importlib.util.find_spec("nvidia")
roots = list(spec.submodule_search_locations) if spec else []
hits = set()
for r in roots:
    for dirpath, _, files in os.walk(r):
        if any(f.startswith(("libcublas.so.13", "libcurand.so.10", "libcudart.so.13", "libcublasLt.so.13")) for f in files):
            hits.add(dirpath)
print(":".join(sorted(hits)))
PY
)
export LD_LIBRARY_PATH="${d}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
