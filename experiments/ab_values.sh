#!/usr/bin/env bash
# Private experiment (GPU machine): bench a subset under several values of a developer knob,
# alternating, twice, after the build (and tests) that precede it. Prints the bench rows only.
#   bash experiments/ab_values.sh OUT VAR "v1 v2 ..." "formats" [tokens] [backends]
# e.g. bash experiments/ab_values.sh OUT KVK_FP8_HEAD_SPLIT "0 1" "fp8:head" 32768
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?OUT}; VAR=${2:?VAR}; VALS=${3:?values}; FMTS=${4:?formats}; TOK=${5:-4096}; BK=${6:-cuda}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
for r in 1 2; do
  for v in $VALS; do
    echo "== run $r $VAR=$v"
    env "$VAR=$v" timeout 200 python3 -m bench quant --backends "$BK" --formats $FMTS --tokens $TOK \
      --out "$OUT/b-$VAR-$r-$v" 2>&1 | grep -E "^ *(de)?quantize"
    rm -rf "$OUT/b-$VAR-$r-$v"
  done
done
