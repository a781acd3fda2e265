#!/usr/bin/env bash
# Private experiment (GPU machine): build, fp8 tests, synccheck, then the fp8 tensor/head bench
# with the one-pass kernel's UNI variant off (KVK_FP8_UNI=0) and on, alternating, same process
# conditions. Usage: bash scripts/exp/ab_fp8_uni.sh OUT
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?OUT}; mkdir -p "$OUT"
export PYTHONPATH=$PWD
BENCH=0 bash scripts/gpu_check.sh "$OUT/check" tests/test_quant.py -k "fp8 or graph or compile" > "$OUT/check.txt" 2>&1
grep -E "build rc|passed|failed|Error" "$OUT/check.txt" | tail -5
grep -E "^FAILED|^ERROR" "$OUT/check/pytest.log" | head -20
timeout 120 compute-sanitizer --tool synccheck python3 scripts/exp/synccheck_fp8.py 2>&1 | tail -14
for r in 1 2; do
  for v in 0 1; do
    echo "== run $r KVK_FP8_UNI=$v"
    KVK_FP8_UNI=$v timeout 200 python3 -m bench quant --backends cuda --formats ${FORMATS:-fp8:tensor fp8:head} \
      --tokens 4096 --out "$OUT/b$r$v" 2>&1 | grep -E "^ *quantize"
  done
done
