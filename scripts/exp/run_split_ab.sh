#!/usr/bin/env bash
# Private experiment: the phase-split one-pass fp8 kernel (quant_fp8_split_kernel, default) against
# the resident one (KVK_FP8_SPLIT=0) in one GPU call: build, a smoke run (a hang shows in 45 s),
# fp8 tests, sanitizers, bench A/B.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?OUT}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
BENCH=0 timeout 200 bash scripts/gpu_check.sh "$OUT/build" tests/test_quant.py --co -q > "$OUT/build.txt" 2>&1
grep -E "build rc" "$OUT/build.txt"
timeout 45 python3 scripts/exp/synccheck_fp8.py > "$OUT/smoke.txt" 2>&1; echo "smoke rc=$?"; tail -5 "$OUT/smoke.txt"
grep -q "mismatches: 0" "$OUT/smoke.txt" || exit 1
for v in 1 0; do
  echo "== KVK_FP8_SPLIT=$v"
  KVK_FP8_SPLIT=$v timeout 150 python3 -m bench quant --backends cuda --formats fp8:tensor fp8:head \
    --tokens 4096 --out "$OUT/bench_split$v" > "$OUT/bench_split$v.txt" 2>&1
  grep -E "quantize" "$OUT/bench_split$v.txt" | head -20
done
timeout 200 python3 -m pytest -q -x tests/test_quant.py -k "fp8 or graph or compile" > "$OUT/pytest.txt" 2>&1; tail -3 "$OUT/pytest.txt"
timeout 60 compute-sanitizer --tool synccheck python3 scripts/exp/synccheck_fp8.py > "$OUT/synccheck.txt" 2>&1; tail -3 "$OUT/synccheck.txt"
timeout 90 compute-sanitizer --tool racecheck python3 scripts/exp/synccheck_fp8.py > "$OUT/racecheck.txt" 2>&1; tail -3 "$OUT/racecheck.txt"
