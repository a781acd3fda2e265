#!/usr/bin/env bash
# Private experiment: build and run scripts/exp/fp8_resident_exp.cu on a GPU machine.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?OUT}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
nvcc -arch=sm_90 -std=c++17 -O3 -Icsrc scripts/exp/fp8_resident_exp.cu -o /tmp/fp8x > "$OUT/fp8x_build.txt" 2>&1 || { tail "$OUT/fp8x_build.txt"; exit 1; }
timeout 150 stdbuf -oL /tmp/fp8x 2>&1 | tee "$OUT/fp8x.txt"
