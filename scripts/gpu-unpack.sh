# Sourced by the GPU-machine scripts (gpu-check.sh, gpu-profile.sh): unless BIN names a folder of
# binaries already, unpacks the xz-compressed CUDA binaries that scripts/gpu-pack.sh put in .gpu/bin
# into $work/bin, sets BIN to it and sources the runtime-library setup. Needs `work` and `PY` set;
# appends what the setup prints to `$log` when it is set.
if [[ -z ${BIN:-} ]]; then
  BIN=$work/bin
  mkdir -p "$BIN"
  for f in .gpu/bin/*.xz; do
    name=$(basename "$f" .xz)
    if command -v xz >/dev/null; then xz -dc "$f" > "$BIN/$name"
    else "$PY" -c "import lzma,sys,shutil; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$f" "$BIN/$name"; fi
    chmod +x "$BIN/$name"
  done
  # shellcheck disable=SC1091
  source .gpu/device-env.sh >> "${log:-/dev/null}" 2>&1
fi
