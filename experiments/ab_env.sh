#!/usr/bin/env bash
# Private experiment (GPU machine): build, a test subset, then a bench subset with a developer
# switch off (VAR=0) and on (VAR=1), alternating, twice. Usage:
#   bash experiments/ab_env.sh OUT VAR "pytest -k expression" "formats" [tokens] [backends]
# e.g. bash experiments/ab_env.sh OUT KVK_TOK_DQ_DENSE "token" "int4:g32:token int2:g32:token" "4096 32768"
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?OUT}; VAR=${2:?VAR}; SEL=${3:?pytest -k}; FMTS=${4:?formats}; TOK=${5:-4096}; BK=${6:-cuda}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
BENCH=0 bash scripts/gpu_check.sh "$OUT/check" tests/test_quant.py -k "$SEL" > "$OUT/check.txt" 2>&1
grep -E "build rc|passed|failed|Error" "$OUT/check.txt" | tail -5
grep -E "^FAILED|^ERROR" "$OUT/check/pytest.log" | head -20
rm -f "$OUT/check/junit.xml" "$OUT/check/build.txt"
bash experiments/ab_values.sh "$OUT" "$VAR" "0 1" "$FMTS" "$TOK" "$BK"
