#!/usr/bin/env bash
# Private experiment driver (one device call): build, then the A/B runs of this session.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?OUT}; mkdir -p "$OUT"
export PYTHONPATH=$PWD
exec > >(tee -a "$OUT/exp.log") 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
[ -d wheels ] && python3 -m pip install --quiet --no-index --no-deps wheels/*.whl 2>&1 | tail -1
( nvcc -arch=sm_90 -std=c++17 -O3 -Icsrc scripts/exp/fp8_resident_exp.cu -o /tmp/fp8x > "$OUT/fp8x_build.txt" 2>&1; echo "fp8x build rc=$?" ) &
bpid=$!
t0=$(date +%s)
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v python3)" \
  -DKVK_CUDA_ARCHS=90-real -DKVK_OUTPUT_DIR="$PWD/kvkernels" > "$OUT/build.txt" 2>&1 && cmake --build build -j 12 >> "$OUT/build.txt" 2>&1
echo "build rc=$? $(( $(date +%s) - t0 ))s"
wait $bpid  # not a bare wait: that also waits for the tee above
echo "== fp8 resident experiment"; timeout 100 stdbuf -oL /tmp/fp8x
echo "== token dequantize wide: tests"
KVK_TOK_DQ_WIDE=1 timeout 90 python3 -m pytest -q -x tests/test_quant.py -k "cuda and token" 2>&1 | tail -3
for w in 0 1; do
  echo "== bench token formats, KVK_TOK_DQ_WIDE=$w"
  KVK_TOK_DQ_WIDE=$w timeout 80 python3 -m bench quant --backends cuda --formats int4:g32:token int2:g32:token \
    --tokens 4096 32768 2>&1 | grep -i "dequant"
done
echo "== triton dq_token sweep"
timeout 100 python3 scripts/triton_tune.py --only dq_token --tokens 4096 32768 --budget 60 2>&1 | tail -40
