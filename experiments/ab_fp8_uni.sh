#!/usr/bin/env bash
# Private experiment (GPU machine): build, fp8 tests, synccheck, then the fp8 tensor/head bench
# with the one-pass kernel's UNI variant off (KVK_FP8_UNI=0) and on, alternating.
# Usage: bash experiments/ab_fp8_uni.sh OUT
set -uo pipefail
cd "$(dirname "$0")/.."
bash experiments/ab_env.sh "${1:?OUT}" KVK_FP8_UNI "fp8 or graph or compile" "${FORMATS:-fp8:tensor fp8:head}"
export PYTHONPATH=$PWD
timeout 120 compute-sanitizer --tool synccheck python3 experiments/synccheck_fp8.py 2>&1 | tail -14
