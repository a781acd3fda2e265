#!/usr/bin/env bash
# One GPU call: build + the suite (xdist) + a short bench per family, each bench time-bounded.
#   bash scripts/gpu_phase.sh OUT   (env: BENCH_S per-bench bound, default 100 s; TESTS=0 skips the suite;
#   PHASE_BENCHES: any of paged paged-full codec blend quant, default "paged codec blend")
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
BENCH=0 bash scripts/gpu_check.sh "$OUT" > "$OUT/check.txt" 2>&1
grep -E "build rc|tests rc" "$OUT/summary.txt"; tail -3 "$OUT/pytest.log"
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -30
B=${BENCH_S:-100}
run() { local name=$1; shift; local t0=$(date +%s); timeout "$B" "$@" > "$OUT/bench-$name.txt" 2>&1; echo "bench $name rc=$? in $(( $(date +%s) - t0 ))s"; }
for spec in ${PHASE_BENCHES:-paged codec blend}; do
  case $spec in
    paged) KVK_BENCH_QUICK=1 run paged python3 -m bench paged --out "$OUT" ;;
    paged-full) run paged-full python3 -m bench paged --out "$OUT" ;;   # 8B + 70B, 16..32K tokens (issue 21)
    codec) run codec python3 -m bench codec --backends cuda --tokens 4096 --out "$OUT" ;;
    blend) run blend python3 -m bench blend --out "$OUT" ;;
    quant) run quant python3 -m bench quant --backends cuda,triton --out "$OUT" ;;
  esac
done
