#!/usr/bin/env bash
# The main job on a fresh machine: set up, show the backends, run the quantization bench on
# this machine, and measure perplexity of SmolLM2-135M with its KV cache in every format.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
$PY -m bench quant
$PY -m kvkernels.eval.ppl --tokens ${DEMO_TOKENS:-2048}
