#!/usr/bin/env bash
# A bounded fuzzing campaign over every target: seeds from fuzz/seeds, SECONDS per target (default
# 120); TARGETS="a b" runs only those. Needs cargo-fuzz (`cargo install cargo-fuzz`); on a stable
# toolchain RUSTC_BOOTSTRAP=1 lets it use the sanitizer flags. Prints libFuzzer's final stats line per
# target.
set -euo pipefail
cd "$(dirname "$0")"
secs=${SECONDS_PER_TARGET:-120}
export RUSTC_BOOTSTRAP=1
targets=${TARGETS:-imagecode_json caption_json csv_readers image_decode caption_text model_config}
for t in $targets; do
  mkdir -p "corpus/$t"
  cp -n seeds/$t/* "corpus/$t/" 2>/dev/null || true
  echo "== $t ($secs s)"
  cargo fuzz run -O "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 2>&1 \
    | grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb|stat::new_units_added|==[0-9]+==|SUMMARY|Done)" || true
  echo "crash artifacts: $(ls artifacts/$t 2>/dev/null | wc -l)"
done
