# Sourced by the GPU-machine scripts (gpu-check.sh, gpu-dist-check.sh): `step` runs one command
# with a time limit cut to what is left of DEADLINE_S, logs it, and records its status, seconds and
# the peak GPU memory in use while it ran (nvidia-smi every 100 ms, minus the memory in use before)
# as $work/parts/step-<name>.json; `collect_json OUT` joins every part into one JSON.
# Needs `work`, `log`, `started`, DEADLINE_S and `say`; ONLY='<bash regex>' runs the steps it matches.

step() {
  local name=$1 limit=$2; shift 2
  [[ -n ${ONLY:-} && ! $name =~ $ONLY ]] && return
  local left=$(( DEADLINE_S - ($(date +%s) - started) - 10 ))
  if (( left < 15 )); then
    say "$name: skipped, ${left}s left of the ${DEADLINE_S}s deadline"
    echo "{\"step\": \"$name\", \"rc\": null, \"skipped\": true}" > "$work/parts/step-$name.json"
    return
  fi
  (( limit > left )) && limit=$left
  say "$name (limit ${limit}s): $*"
  local sampler="" base=0
  if command -v nvidia-smi >/dev/null; then
    base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$work/mem-$name" 2>/dev/null &
    sampler=$!
  fi
  local start; start=$(date +%s%N)
  timeout "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  local ms=$(( ($(date +%s%N) - start) / 1000000 ))
  local secs; secs=$(printf '%d.%03d' $(( ms / 1000 )) $(( ms % 1000 )))
  local peak=null
  if [[ -n $sampler ]]; then
    kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
    peak=$(sort -n "$work/mem-$name" | tail -1); peak=$(( ${peak:-0} - base ))
  fi
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $secs, \"gpu_memory_peak_mib\": $peak}" > "$work/parts/step-$name.json"
  say "$name: rc $rc in ${secs}s"
}

# collect_json OUT [EXPECTED_RC_JSON]: every part under $work/parts into OUT; `all_passed` is true
# when every step that ran exited with the status EXPECTED_RC_JSON names for it (default 0), e.g.
# '{"hang": 3}'.
collect_json() {
  "${PY:-python3}" - "$work" "$1" "${2:-{\}}" <<'PY'
import glob, json, os, sys
work, out, expected = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
record = {"steps": {}, "results": {}}
for name in ("gpu.csv", "nccl.txt"):
    path = os.path.join(work, name)
    if os.path.exists(path):
        record[name.split(".")[0]] = open(path).read().strip()
if os.path.exists(".gpu/commit"):
    record["commit"] = open(".gpu/commit").read().strip()
for f in sorted(glob.glob(os.path.join(work, "parts", "*.json"))):
    name = os.path.basename(f)[:-5]
    try:
        data = json.load(open(f))
    except Exception as e:
        data = {"unreadable": str(e)}
    if name.startswith("step-"):
        record["steps"][name[5:]] = data
    else:
        record["results"][name] = data
record["all_passed"] = all(s.get("rc") == expected.get(k, 0) for k, s in record["steps"].items() if not s.get("skipped"))
record["skipped"] = sorted(k for k, s in record["steps"].items() if s.get("skipped"))
json.dump(record, open(out, "w"), indent=1)
print(f"{os.path.basename(out)}: {len(record['steps'])} steps, all passed: {record['all_passed']} -> {out}")
for k, v in record["steps"].items():
    print(f"  {k:22} rc {v.get('rc')}  {v.get('seconds', '-')} s  gpu {v.get('gpu_memory_peak_mib')} MiB")
PY
}
