#!/usr/bin/env bash
# The main job on a fresh machine: set up, show the backends, then the end-to-end run
# (python -m kvkernels.demo: passages prefilled once into a compressed KV store, questions
# answered from it vs full prefill). Extra arguments go to the run, e.g.
#   bash scripts/demo.sh --device cuda --plot ttft.png
#   bash scripts/demo.sh --device cuda --model-shape llama3-8b --passage-tokens 2048
# DEMO_BENCH=1 also runs the quantization bench; DEMO_PPL=1 the perplexity table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1
$PY -m kvkernels
$PY -m kvkernels.demo "$@"
if [ "${DEMO_BENCH:-0}" = 1 ]; then $PY -m bench quant; fi
if [ "${DEMO_PPL:-0}" = 1 ]; then $PY -m kvkernels.eval.ppl --tokens ${DEMO_TOKENS:-2048}; fi
