#!/usr/bin/env bash
# kvkernels' LMCache plugin on a GPU machine without network (for the lead; one `run` call).
#
#   carry: [".whl", ".lmcache_kv"]   (.lmcache_kv optional: real KV files, see docs/lmcache.md)
#   command: bash scripts/lmcache_gpu.sh $OUT
#
# 1. installs the carried Python 3.12 LMCache 0.5.6 wheel and its missing dependencies from
#    .whl/ into /tmp/site (no index, no deps; the image keeps its own torch/numpy/triton);
# 2. builds kvkernels' extension if it is not built (SKIP_BUILD=1 to skip);
# 3. runs tests/test_lmcache.py on the GPU (the serde on device=cuda is exercised by the bench;
#    the tests run the plugin with the CUDA-capable image, incl. LMCache's turboquant on CUDA);
# 4. the round trip + throughput bench: kvkernels (device=cuda and device=cpu) vs LMCache's fp8
#    and turboquant serdes, same KV, same run: serde calls and StorageManager + filesystem tier.
# Writes $OUT/{lmcache_gpu.log, pytest_lmcache.log, bench_*.json, summary.txt}.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: lmcache_gpu.sh OUT_DIR}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/lmcache_gpu.log") 2>&1
PY=${PYTHON:-python3}
echo "== $(date -u +%FT%TZ) $(hostname)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
ls .whl/*.whl > /dev/null 2>&1 || { echo "no .whl/*.whl: carry .whl (see docs/lmcache.md)"; exit 2; }
du -sh .whl
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 2; }
export PYTHONPATH=/tmp/site:$PWD:$PWD/tests LMCACHE_DISABLE_BANNER=1 PYTHONUNBUFFERED=1
$PY - <<'PY' || { echo "LMCache does not import on this image (see above)"; exit 3; }
import torch, numpy
print("python", __import__("sys").version.split()[0], "torch", torch.__version__, "numpy", numpy.__version__,
      "cuda", torch.cuda.is_available())
import lmcache, lmcache.lmcache_native
from lmcache.v1.distributed.storage_manager import StorageManager  # noqa: F401
import kvkernels.integrations.lmcache as p
p.register()
print("lmcache", lmcache.__version__, "plugin registered")
PY
if [ "${SKIP_BUILD:-0}" != 1 ] && ! $PY -c "import kvkernels._C" 2>/dev/null; then
  echo "== build kvkernels._C"
  cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v $PY)" \
    -DKVK_CUDA_ARCHS="${KVK_CUDA_ARCHS:-90-real}" -DKVK_OUTPUT_DIR="$PWD/kvkernels" > "$OUT/build.txt" 2>&1 \
    && cmake --build build -j "${MAX_JOBS:-16}" >> "$OUT/build.txt" 2>&1
  echo "build rc=$?"; tail -3 "$OUT/build.txt"
fi
$PY -c "import kvkernels.codec" 2>/dev/null && echo "kvkernels.codec: present" || echo "kvkernels.codec: MISSING (tests use their test-only stand-in; bench stops)"

echo "== tests/test_lmcache.py"
timeout 900 $PY -m pytest -q -p no:cacheprovider tests/test_lmcache.py > "$OUT/pytest_lmcache.log" 2>&1
trc=$?
tail -15 "$OUT/pytest_lmcache.log"

echo "== bench"
BDIR=/dev/shm/kvk_lmcache_bench   # the filesystem tier on tmpfs: the serdes, not the disk, are timed
brc=0
run_bench() {  # name, args...
  local name=$1; shift
  timeout 900 $PY -m kvkernels.integrations.lmcache.bench --storage --dir "$BDIR" --json "$OUT/bench_$name.json" "$@" \
    > "$OUT/bench_$name.txt" 2>&1 || { brc=$?; echo "bench $name rc=$brc"; }
  grep -E '^(kvkernels|fp8|turboquant) ' "$OUT/bench_$name.txt" || tail -5 "$OUT/bench_$name.txt"
}
SHAPE=${SHAPE:-32,4096,8,128}     # a Llama-3-8B-like cache: 32 layers, 8 KV heads x 128, 4096 tokens
run_bench synthetic_cuda --shape "$SHAPE" --device cuda
run_bench synthetic_cpu --shape "$SHAPE" --device cpu --serdes kvkernels
for f in .lmcache_kv/*.pt; do
  [ -f "$f" ] || continue
  n=$(basename "$f" .pt)
  run_bench "${n}_cuda" --kv "$f" --device cuda
done
rm -rf "$BDIR"
{
  echo "tests rc=$trc bench rc=$brc"
  grep -E "passed|failed|error" "$OUT/pytest_lmcache.log" | tail -1
  for j in "$OUT"/bench_*.json; do
    [ -f "$j" ] && $PY - "$j" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"\n{sys.argv[1].split('/')[-1]}: {r['kv']} {r['dtype']} chunks {r['chunk_shape']} x{r['objects']} on {r['cuda']} (kvkernels device {r['device']}; codec fake: {r['codec_fake']})")
print(f"{'serde':12} {'bits/elt':>8} {'ratio':>6} {'ser GB/s':>9} {'deser GB/s':>10} {'store GB/s':>10} {'retr GB/s':>9} {'disk MB':>8}  check")
for n, row in r["serdes"].items():
    if "error" in row:
        print(f"{n:12} ERROR {row['error']}"); continue
    s, st = row["serde"], row.get("storage", {})
    chk = {k: v for k, v in {**s, **st}.items() if k in ("bit_exact_vs_codec", "rel_l2_err")}
    print(f"{n:12} {s['bits_per_element']:8.3f} {s['ratio_vs_source']:6.2f} {s['serialize_GBps']:9.3f} {s['deserialize_GBps']:10.3f} "
          f"{st.get('store_GBps', float('nan')):10.3f} {st.get('retrieve_GBps', float('nan')):9.3f} {st.get('disk_bytes', 0)/1e6:8.2f}  {chk} {st.get('error', '')}")
PY
  done
} > "$OUT/summary.txt"
cat "$OUT/summary.txt"
[ $trc -eq 0 ] && [ $brc -eq 0 ]
