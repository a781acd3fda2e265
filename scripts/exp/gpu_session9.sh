#!/usr/bin/env bash
# Private (ninth session, GPU machine): the full run (build, whole suite, bench), then the A/B of
# the head-scope split and the token-dequantize harness; everything under $OUT, summary on stdout.
set -u
export PYTHONPATH=$PWD
t0=$(date +%s)
bash scripts/gpu_check.sh $OUT/g > $OUT/g.txt 2>&1
grep -E "build rc|passed|failed" $OUT/g.txt | tail -3
grep -E "^FAILED|^ERROR" $OUT/g/pytest.log | head -20
rm -f $OUT/g/junit.xml $OUT/g/build.txt $OUT/g/bench.txt $OUT/g.txt
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
echo "== t=$(( $(date +%s) - t0 ))s head split A/B"
timeout 150 bash scripts/exp/ab_values.sh $OUT KVK_FP8_HEAD_SPLIT "0 1" "fp8:head" 32768 > $OUT/ab.txt 2>&1
grep -E "==|llama" $OUT/ab.txt
echo "== t=$(( $(date +%s) - t0 ))s harness"
[ $(( $(date +%s) - t0 )) -lt 470 ] && { nvcc -arch=sm_90 -std=c++17 -O3 -Icsrc scripts/exp/tok_dq_exp.cu -o /tmp/tokdq && timeout 60 /tmp/tokdq; } > $OUT/harness.txt 2>&1
cat $OUT/harness.txt | tail -30
echo "== t=$(( $(date +%s) - t0 ))s done"
