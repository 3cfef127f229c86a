#!/usr/bin/env bash
# Where the S0 training step's GPU time goes, kernel by kernel, ours beside PyTorch's, on a lent GPU
# machine (run from the repository root with .gpu/ from scripts/gpu-pack.sh carried along):
#
#  1. `ncu` (Nsight Compute, kernel durations only, clocks left alone) on `xtask bench s0-step` with
#     --cuda-profiler-range, so only the timed steps are profiled: every kernel's duration, summed by
#     kernel name -> $OUT/s0-kernels-ours.txt and .json;
#  2. torch.profiler on one PyTorch step of the same workload -> $OUT/s0-kernels-torch.txt.
#
#   run(command="bash scripts/gpu-profile.sh", carry=[".gpu"], timeout_s=420)
#
# PRECISION (bf16), S0_BATCH (32), STEPS (1 profiled step) and NCU_LIMIT_S (300) change it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-target/gpu-profile}
PY=${PYTHON:-python3}
PRECISION=${PRECISION:-bf16}
S0_BATCH=${S0_BATCH:-32}
STEPS=${STEPS:-1}
mkdir -p "$OUT"
work=${WORK:-/tmp/ctxalign-gpu-profile}
rm -rf "$work"; mkdir -p "$work"
log=$OUT/gpu-profile.log
: > "$log"
# shellcheck source=scripts/gpu-unpack.sh
source scripts/gpu-unpack.sh
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1)
echo "ncu: ${NCU:-not found}" | tee -a "$log"

if [[ -n $NCU ]]; then
  start=$(date +%s)
  timeout "${NCU_LIMIT_S:-300}" "$NCU" --profile-from-start off --clock-control none --cache-control none \
    --metrics gpu__time_duration.sum --csv --page raw --print-units base --log-file "$work/ncu.csv" \
    "$BIN/xtask" bench s0-step --device cuda --precision "$PRECISION" --batch "$S0_BATCH" --steps "$STEPS" \
    --cuda-profiler-range --cache "$work/blip-base" --out "$work" >> "$log" 2>&1
  echo "ncu: rc $? in $(( $(date +%s) - start )) s" | tee -a "$log"
  "$PY" - "$work/ncu.csv" "$OUT/s0-kernels-ours" "$STEPS" <<'PY' 2>&1 | tee -a "$log"
import collections, csv, json, sys
path, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = [r for r in csv.reader(l for l in open(path) if l.startswith('"'))]
head = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
cols = rows[head]
name_col = cols.index("Kernel Name")
# --page raw has a column per metric; the details page, one "Metric Value" column.
dur_col = cols.index("gpu__time_duration.sum") if "gpu__time_duration.sum" in cols else cols.index("Metric Value")
by_name = collections.defaultdict(lambda: [0, 0.0])
for r in rows[head + 1:]:
    try:
        ns = float(r[dur_col].replace(",", ""))  # ncu may group thousands
    except (ValueError, IndexError):
        continue  # the units row
    k = by_name[r[name_col].split("(")[0][:120]]
    k[0] += 1
    k[1] += ns
total = sum(v[1] for v in by_name.values())
count = sum(v[0] for v in by_name.values())
table = sorted(by_name.items(), key=lambda kv: -kv[1][1])
lines = [f"{count / steps:.0f} kernels, {total / steps / 1e6:.2f} ms of kernel time per step ({steps} step(s) profiled)",
         f"{'ms/step':>9} {'share':>6} {'calls/step':>10}  kernel"]
for name, (n, ns) in table[:80]:
    lines.append(f"{ns / steps / 1e6:9.3f} {100 * ns / total:5.1f}% {n / steps:10.0f}  {name}")
open(out + ".txt", "w").write("\n".join(lines) + "\n")
json.dump({"kernels_per_step": count / steps, "kernel_ms_per_step": total / steps / 1e6,
           "by_kernel": [{"name": k, "calls_per_step": n / steps, "ms_per_step": ns / steps / 1e6}
                         for k, (n, ns) in table]}, open(out + ".json", "w"), indent=1)
print("\n".join(lines[:40]))
PY
fi

timeout 120 "$PY" xtask/bench_s0_torch.py --device cuda:0 --dtype "$PRECISION" --batch "$S0_BATCH" --steps 3 \
  --profile "$OUT/s0-kernels-torch.txt" >> "$log" 2>&1
echo "torch profile: rc $?" | tee -a "$log"
head -45 "$OUT/s0-kernels-torch.txt" 2>/dev/null | cut -c1-200
