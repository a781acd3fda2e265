#!/usr/bin/env bash
# Create LMCache's own virtual environment (its pins, numpy<=2.2.6 and setuptools<81, clash with
# the main environment's numpy 2.4): .venv-lmcache/ at the repository root, CPU torch 2.13.0,
# LMCache at the release kvkernels[lmcache] pins, and kvkernels' own run-time dependencies.
# Idempotent: an existing venv whose lmcache imports is kept. Prints the venv's python on its last line.
#   bash scripts/lmcache_env.sh            # create/refresh
#   LMCACHE_VERSION=0.5.6 bash scripts/lmcache_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${LMCACHE_VENV:-$ROOT/.venv-lmcache}
LMCACHE_VERSION=${LMCACHE_VERSION:-0.5.6}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PY=${PYTHON:-python3}
t0=$(date +%s)
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import lmcache, importlib.metadata as m; assert m.version('lmcache') == '$LMCACHE_VERSION'" 2>/dev/null; then
  echo "lmcache_env: $VENV already has lmcache $LMCACHE_VERSION" >&2
else
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade "pip>=24" >&2
  # CPU torch first (pip's find-links / local cache supplies it); lmcache's unpinned "torch" keeps it.
  "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" >&2
  "$VENV/bin/python" -m pip install -q "lmcache==$LMCACHE_VERSION" "numpy<=2.2.6" "setuptools<81" >&2
  # kvkernels' own run-time deps (the package itself is used from the source tree via PYTHONPATH).
  "$VENV/bin/python" -m pip install -q triton pybind11 pytest >&2 || true
fi
"$VENV/bin/python" -c "import lmcache, torch, numpy; print('lmcache_env: lmcache', lmcache.__file__, 'torch', torch.__version__, 'numpy', numpy.__version__)" >&2
echo "lmcache_env: ready in $(( $(date +%s) - t0 )) s" >&2
echo "$VENV/bin/python"
