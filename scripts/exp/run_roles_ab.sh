#!/usr/bin/env bash
# Private experiment: fp8 tensor/head one pass with block roles (quant_fp8_roles_kernel,
# KVK_FP8_ONEPASS=roles) against the resident kernel, in one GPU call: build, a smoke run (a hang
# shows in 45 s), bench A/B, fp8 tests with roles on, sanitizer.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?OUT}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
BENCH=0 timeout 200 bash scripts/gpu_check.sh "$OUT/build" tests/test_quant.py --co -q > "$OUT/build.txt" 2>&1
grep -E "build rc" "$OUT/build.txt"
KVK_FP8_ONEPASS=roles timeout 45 python3 scripts/exp/synccheck_fp8.py > "$OUT/smoke.txt" 2>&1; echo "smoke rc=$?"; tail -5 "$OUT/smoke.txt"
grep -q "mismatches: 0" "$OUT/smoke.txt" || exit 1
run() {  # name, env...
  local name=$1; shift
  echo "== $name"
  env "$@" timeout 120 python3 -m bench quant --backends cuda --formats fp8:tensor fp8:head \
    --tokens ${TOKENS:-4096} --out "$OUT/bench_$name" > "$OUT/bench_$name.txt" 2>&1
  grep -E "^quantize" "$OUT/bench_$name.txt"
}
run resident KVK_FP8_ONEPASS=resident
run roles_lag2 KVK_FP8_ONEPASS=roles KVK_FP8_LAG=2
run roles_lag3 KVK_FP8_ONEPASS=roles KVK_FP8_LAG=3
run roles_lag4 KVK_FP8_ONEPASS=roles KVK_FP8_LAG=4
run roles_lag3_na80 KVK_FP8_ONEPASS=roles KVK_FP8_LAG=3 KVK_FP8_NA=80
run roles_lag3_na56 KVK_FP8_ONEPASS=roles KVK_FP8_LAG=3 KVK_FP8_NA=56
TOKENS=8192 run t8k_resident KVK_FP8_ONEPASS=resident
TOKENS=8192 run t8k_roles_lag2 KVK_FP8_ONEPASS=roles KVK_FP8_LAG=2
KVK_FP8_ONEPASS=roles timeout 150 python3 -m pytest -q tests/test_quant.py -k "fp8 or graph or compile" > "$OUT/pytest_roles.txt" 2>&1; tail -4 "$OUT/pytest_roles.txt"
KVK_FP8_ONEPASS=roles timeout 60 compute-sanitizer --tool synccheck python3 scripts/exp/synccheck_fp8.py > "$OUT/synccheck.txt" 2>&1; tail -2 "$OUT/synccheck.txt"
