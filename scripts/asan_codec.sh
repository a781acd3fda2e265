#!/usr/bin/env bash
# The CPU entropy coders under AddressSanitizer + UndefinedBehaviorSanitizer: builds
# kvkernels._codec_cpu with -fsanitize=address,undefined into a temp dir and runs the seeded
# mutation loop (fuzz/mutate_codec.py) against it; any sanitizer report aborts with rc != 0.
#   scripts/asan_codec.sh [ITERS=2000] [SEED=1]
set -euo pipefail
cd "$(dirname "$0")/.."
ITERS=${ITERS:-2000}
SEED=${SEED:-1}
OUT=$(mktemp -d /tmp/kvk_asan.XXXXXX)
SO=$(OUT="$OUT" CXXFLAGS_EXTRA="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -O1" \
     scripts/build_codec_cpu.sh | tail -1)
echo "asan build: $SO"
LIBASAN=$(${CXX:-g++} -print-file-name=libasan.so)
LIBUBSAN=$(${CXX:-g++} -print-file-name=libubsan.so)
# detect_leaks=0: CPython itself "leaks" at exit; we look for out-of-bounds / UB.
LD_PRELOAD="$LIBASAN $LIBUBSAN" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  KVK_CODEC_CPU_PATH="$SO" PYTHONPATH=. python3 fuzz/mutate_codec.py --iters "$ITERS" --seed "$SEED"
echo "asan_codec: clean ($ITERS iterations, seed $SEED)"
