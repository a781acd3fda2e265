#!/usr/bin/env bash
# Build the CPU entropy coder kvkernels/_codec_cpu*.so with g++ alone (no CUDA, no CMake needed).
#   scripts/build_codec_cpu.sh                 # -O3
#   CXXFLAGS_EXTRA="-fsanitize=address,undefined -g -O1" OUT=/tmp/asan scripts/build_codec_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-kvkernels}
SUFFIX=$($PY -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
INC=$($PY -m pybind11 --includes)
mkdir -p "$OUT"
${CXX:-g++} -std=c++17 -O3 -fPIC -shared -Wall -Wextra -ffp-contract=off ${CXXFLAGS_EXTRA:-} $INC -Icsrc \
  csrc/codec_cpu.cpp python/codec_cpu.cpp -o "$OUT/_codec_cpu$SUFFIX"
echo "$OUT/_codec_cpu$SUFFIX"
