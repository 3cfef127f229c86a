"""Compares training runs that must be the same run: W ranks × batch b against 1 rank × W·b.

    python3 scripts/compare_runs.py [--json OUT] NAME RUN_A RUN_B WEIGHTS_FILE TERMS [NAME RUN_A ...]

For each group: every loss term of every step in the runs' `metrics.jsonl` (relative difference),
and every tensor of WEIGHTS_FILE (max |a − b| over the tensor's scale, max(1, max |a|)). Tensors whose
gradient is rounding noise by construction — attention key biases, since softmax is
shift-invariant — are reported apart: Adam turns that noise into full-size steps in either run.
Passes when every term is within 1e-5 and every other tensor within 1e-5 of its scale (the CPU
tests' tolerances; exit status 1 otherwise). Needs numpy and safetensors.
"""
import json
import sys

import numpy as np
from safetensors.numpy import load_file


def curve(run, terms):
    rows = [json.loads(l) for l in open(f"{run}/metrics.jsonl") if l.strip()]
    return [[r[t] for t in terms] for r in rows if "loss" in r]


def gradient_free(name):
    # Keys of attention: `.key.bias` (BERT names) or `k_proj.bias`.
    return name.endswith("key.bias") or name.endswith("k_proj.bias")


def compare(name, a, b, weights, terms):
    terms = terms.split(",")
    ca, cb = curve(a, terms), curve(b, terms)
    worst_term = 0.0
    for x, y in zip(ca, cb):
        for u, v in zip(x, y):
            worst_term = max(worst_term, abs(u - v) / max(abs(u), 1e-3))
    wa, wb = load_file(f"{a}/{weights}"), load_file(f"{b}/{weights}")
    worst, worst_name, noise = 0.0, None, 0.0
    for key, x in wa.items():
        x, y = x.astype(np.float64), wb[key].astype(np.float64)
        rel = float(np.abs(x - y).max() / max(1.0, float(np.abs(x).max()))) if x.size else 0.0
        if gradient_free(key):
            noise = max(noise, rel)
        elif rel >= worst:
            worst, worst_name = rel, key
    passed = len(ca) == len(cb) and len(ca) > 0 and worst_term <= 1e-5 and worst <= 1e-5 and set(wa) == set(wb)
    return {
        "name": name, "steps": [len(ca), len(cb)], "terms": terms,
        "worst_term_relative": worst_term, "worst_tensor_relative": worst, "worst_tensor": worst_name,
        "gradient_free_tensors_relative": noise, "tensors": len(wa), "passed": passed,
    }


def main(argv):
    out = None
    if argv[:1] == ["--json"]:
        out, argv = argv[1], argv[2:]
    if len(argv) % 5 or not argv:
        sys.exit(__doc__)
    results = [compare(*argv[i:i + 5]) for i in range(0, len(argv), 5)]
    for r in results:
        print(f"{r['name']:12} steps {r['steps']}  worst term {r['worst_term_relative']:.2e}  worst tensor "
              f"{r['worst_tensor_relative']:.2e} ({r['worst_tensor']})  {'ok' if r['passed'] else 'FAILED'}")
    if out:
        json.dump({"groups": results, "passed": all(r["passed"] for r in results)}, open(out, "w"), indent=1)
    sys.exit(0 if all(r["passed"] for r in results) else 1)


if __name__ == "__main__":
    main(sys.argv[1:])
