#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite. Without a GPU the Triton kernels run in the
# interpreter (TRITON_INTERPRET=1, set by tests/conftest.py) and CUDA tests are skipped with a reason.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
PY=${PYTHON:-python3}
$PY -m pytest -q "$@"
rc=$?
if [ $rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi
exit $rc
