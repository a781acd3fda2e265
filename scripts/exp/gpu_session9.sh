#!/usr/bin/env bash
# Private (ninth session, GPU machine), second call: build + the changed kernels' tests (also with
# KVK_FP8_GRID_ALL=1), the Triton dq_token sweep, the A/B of KVK_FP8_GRID_ALL and
# KVK_TRITON_DQ_SPLIT, then the full bench with the winners. Everything under $OUT.
set -u
export PYTHONPATH=$PWD
t0=$(date +%s)
el() { echo "== t=$(( $(date +%s) - t0 ))s $*"; }
BENCH=0 bash scripts/gpu_check.sh $OUT/c tests/test_quant.py -k "computed_scale_special or dequantize_split or dense or token_dequantize" > $OUT/c.txt 2>&1
grep -E "build rc|passed|failed" $OUT/c.txt | tail -2
grep -E "^FAILED|^ERROR" $OUT/c/pytest.log | head
rm -rf $OUT/c
el "grid-all tests"
KVK_FP8_GRID_ALL=1 python3 -m pytest -q tests/test_quant.py -k "computed_scale_special or graph" > $OUT/grid-all-tests.log 2>&1
tail -1 $OUT/grid-all-tests.log; grep -E "^FAILED" $OUT/grid-all-tests.log | head
el "A/B grid-all"
timeout 200 bash scripts/exp/ab_values.sh $OUT KVK_FP8_GRID_ALL "0 1" "fp8:tensor fp8:head" "4096 32768" > $OUT/ab-grid.txt 2>&1
grep -E "==|^quantize" $OUT/ab-grid.txt
el "A/B triton split"
timeout 200 bash scripts/exp/ab_values.sh $OUT KVK_TRITON_DQ_SPLIT "1 2 4" "int4:g32:token int2:g32:token" "4096 32768" triton > $OUT/ab-split.txt 2>&1
grep -E "==|^dequantize" $OUT/ab-split.txt
# winners: mean % of copy over the runs, per value
pick() { python3 - "$1" <<'PY'
import re, sys, collections
acc = collections.defaultdict(list); v = None
for line in open(sys.argv[1]):
    m = re.match(r"== run \d+ \S+=(\S+)", line)
    if m: v = m.group(1); continue
    m = re.search(r"([\d.]+)% of copy", line)
    if m and v is not None and "llama3-8b" in line and ("quantize " in line[:11] or "dequantize" in line[:11]):
        if ("fp8" in line and line.startswith("quantize")) or ("token" in line and line.startswith("dequantize")):
            acc[v].append(float(m.group(1)))
means = {k: sum(x) / len(x) for k, x in acc.items() if x}
print(max(means, key=means.get) if means else "", file=sys.stdout)
print(means, file=sys.stderr)
PY
}
GA=$(pick $OUT/ab-grid.txt); SP=$(pick $OUT/ab-split.txt)
el "winners: KVK_FP8_GRID_ALL=$GA KVK_TRITON_DQ_SPLIT=$SP; full bench"
mkdir -p $OUT/g
env KVK_FP8_GRID_ALL=${GA:-0} KVK_TRITON_DQ_SPLIT=${SP:-0} python3 -m bench quant --backends cuda,triton --out $OUT/g > $OUT/g/bench.txt 2>&1
echo "bench rc=$? KVK_FP8_GRID_ALL=$GA KVK_TRITON_DQ_SPLIT=$SP" >> $OUT/g/bench.txt
python3 - <<'PY'
import json, os
rows = json.load(open(os.environ["OUT"] + "/g/quant.json"))
rows = rows["rows"] if isinstance(rows, dict) else rows
big = [r for r in rows if r["bytes"] >= 64 << 20 and r.get("pct_copy")]
low = [r for r in big if r["pct_copy"] < 90]
print(f"{len(big) - len(low)} of {len(big)} rows >= 64 MiB at >= 90%")
for r in low:
    print(f"  {r['op']:10s} {r['format']:18s} {r['backend']:6s} {r['model']:12s} T={r['T']:<6d} {r['pct_copy']:5.1f}%")
PY
el "tune"
timeout 100 python3 scripts/triton_tune.py --tokens 4096 32768 --only dq_token --budget 80 > $OUT/tune.txt 2>&1
tail -20 $OUT/tune.txt
el done
