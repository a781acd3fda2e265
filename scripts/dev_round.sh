#!/usr/bin/env bash
# one development round on the GPU machine (temporary)
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${1:?}
python3 -m pip install -q --no-index --no-deps wheels/*.whl >/dev/null 2>&1
(cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE=$(command -v python3) -DKVK_CUDA_ARCHS=90-real -DKVK_OUTPUT_DIR=$PWD/kvkernels >/dev/null && cmake --build build -j16 >/dev/null) || { echo BUILD FAILED; exit 1; }
python3 -m pytest -q tests/test_quant.py -k "token or fp8" 2>&1 | tail -4 | tee $OUT/tests.txt
python3 scripts/diag_fp8_pass.py 4096 2>&1 | tee $OUT/fp8pass.txt
for v in "2 2" "4 1" "4 2" "2 3"; do set -- $v; KVK_FP8_NCH=$1 KVK_FP8_LAG=$2 DIAG_TRITON=0 python3 scripts/diag_fp8_pass.py 4096 2>&1 | grep one-pass | tee -a $OUT/fp8pass.txt; done
python3 -m bench quant --formats int4:g32:token int2:g32:token --backends cuda --tokens 4096 32768 2>&1 | grep llama | tee $OUT/bench_tok.txt
NCU_CASES="quantize:fp8:tensor,quantize:int2:g32:token,dequantize:int2:g32:token" NCU_BACKENDS=cuda,triton \
 ncu --clock-control none -k 'regex:quant|_q_|_dq_|amax' --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct,smsp__inst_executed.sum,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread \
 --csv python3 scripts/ncu_cases.py 4096 > $OUT/ncu.csv 2> $OUT/ncu.err
python3 - $OUT/ncu.csv <<'PY'
import csv, sys, collections
rows = [r for r in csv.DictReader(l for l in open(sys.argv[1]) if l.startswith('"'))]
k = collections.OrderedDict()
for r in rows:
    k.setdefault((r["ID"], r["Kernel Name"][:60]), {})[r["Metric Name"]] = r["Metric Value"]
for (i, n), m in k.items():
    print(i, n, " ".join(f"{a.split('__')[1][:22]}={v}" for a, v in m.items()))
PY
