#!/usr/bin/env bash
# One call on a GPU machine (no network): build the extension, run the whole test suite on the
# GPU, run the benches. Usage: bash scripts/gpu_check.sh OUT_DIR [pytest args...]
# Writes OUT_DIR/{run.log,pytest.log,junit.xml,quant.json,quant.csv,summary.txt}.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: gpu_check.sh OUT_DIR}; shift || true
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LOG="$OUT/run.log"
exec > >(tee -a "$LOG") 2>&1
echo "== $(date -u +%FT%TZ) $(hostname)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
# carried wheels (pytest, pybind11) for machines without them; no network there
if [ -d wheels ]; then $PY -m pip install --quiet --no-index --no-deps wheels/*.whl 2>&1 | tail -2 || true; fi
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
echo "== build"
t0=$(date +%s)
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v $PY)" \
  -DKVK_CUDA_ARCHS="${KVK_CUDA_ARCHS:-90-real}" -DKVK_OUTPUT_DIR="$PWD/kvkernels" > "$OUT/build.txt" 2>&1 \
  && cmake --build build -j "${MAX_JOBS:-16}" >> "$OUT/build.txt" 2>&1
brc=$?
tail -5 "$OUT/build.txt"; echo "build rc=$brc in $(( $(date +%s) - t0 ))s"
$PY -m kvkernels
echo "== tests"
# pytest-xdist (on the GPU image) spreads the suite over PYTEST_WORKERS processes (0: serial)
XD=""; if [ "${PYTEST_WORKERS:-6}" != 0 ] && $PY -c "import xdist" 2>/dev/null; then XD="-p xdist -n ${PYTEST_WORKERS:-6} --timeout 300"; fi
if [ "${TESTS:-1}" != 0 ]; then $PY -m pytest -q $XD --junitxml="$OUT/junit.xml" "$@" > "$OUT/pytest.log" 2>&1; else echo skipped > "$OUT/pytest.log"; fi
trc=$?
tail -25 "$OUT/pytest.log"
echo "== bench"
# BENCH=0: no bench; BENCH_FAMILIES: which families (default all); quant runs its GPU backends only;
# BENCH_S: a time bound per family (default none); BENCH_TOKENS: --tokens for every family;
# KVK_BENCH_QUICK=1: the paged bench's quick set (Llama-3-8B, T=4096, block 16)
bnc=0
if [ "${BENCH:-1}" != 0 ]; then
  : > "$OUT/bench.txt"
  for fam in ${BENCH_FAMILIES:-quant paged codec blend}; do
    echo "== bench $fam" | tee -a "$OUT/bench.txt"
    extra=""; [ "$fam" = quant ] && extra="--backends ${BENCH_BACKENDS:-cuda,triton}"
    t1=$(date +%s)
    [ -n "${BENCH_TOKENS:-}" ] && extra="$extra --tokens $BENCH_TOKENS"
    timeout "${BENCH_S:-0}" $PY -m bench "$fam" $extra --out "$OUT" >> "$OUT/bench.txt" 2>&1 || bnc=$?
    echo "bench $fam rc=$? in $(( $(date +%s) - t1 ))s" | tee -a "$OUT/bench.txt"
  done
fi
{
  echo "build rc=$brc tests rc=$trc bench rc=$bnc"
  grep -E "passed|failed" "$OUT/pytest.log" | tail -1
  cat "$OUT/bench.txt"
  [ -f "$OUT/quant.json" ] && $PY -m bench.report "$OUT/quant.json" --below 90  # issue #2's target
  for fam in paged codec blend; do [ -f "$OUT/$fam.json" ] && $PY -m bench.report "$OUT/$fam.json"; done
} > "$OUT/summary.txt"
cat "$OUT/summary.txt" | tail -60
