#!/usr/bin/env bash
# What a program that depends on the `ctxalign` library links: no training crate unless it asks for
# `train`, never the command's crates (clap, anyhow, mimalloc, ctrlc), and with
# `default-features = false` no hf-hub and no progress-bar crate either. Fails naming what it found.
set -euo pipefail
cd "$(dirname "$0")/.."
check() {
  local what="$1" forbidden="$2"; shift 2
  local found
  found=$(cargo tree -p ctxalign "$@" -e normal --prefix none | awk '{print $1}' | sort -u | grep -xE "$forbidden" || true)
  if [ -n "$found" ]; then
    echo "lean-check: ctxalign ($what) depends on: $(echo $found)" >&2
    exit 1
  fi
  echo "lean-check: ctxalign ($what) has none of: $forbidden"
}
check "default features" "ctxalign-train|ctxalign-cli|clap|anyhow|mimalloc|ctrlc"
check "no default features" "ctxalign-train|ctxalign-cli|clap|anyhow|mimalloc|ctrlc|indicatif|hf-hub|ureq" --no-default-features
check "feature train" "ctxalign-cli|clap|anyhow|mimalloc|ctrlc" --features train
