#!/usr/bin/env bash
# Profile the quantize kernels with Nsight Compute on a GPU machine. Usage: ncu_quant.sh OUT
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -d wheels ]; then $PY -m pip install --quiet --no-index --no-deps wheels/*.whl 2>&1 | tail -2 || true; fi
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v $PY)" \
  -DKVK_CUDA_ARCHS=90-real -DKVK_OUTPUT_DIR="$PWD/kvkernels" > "$OUT/build.txt" 2>&1 && cmake --build build -j 16 >> "$OUT/build.txt" 2>&1 || { tail -30 "$OUT/build.txt"; exit 1; }
so=$(ls kvkernels/_C*.so | head -1)
[ "${SASS:-1}" = 0 ] || { cuobjdump -sass "$so" > "$OUT/sass.txt" 2>&1; gzip -f "$OUT/sass.txt"; }
ncu --clock-control none --target-processes all -k 'regex:quant|_q_|_dq_|amax' \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
  --section SchedulerStats --section MemoryWorkloadAnalysis --metrics smsp__warp_issue_stalled_long_scoreboard_per_warp_active.pct,smsp__warp_issue_stalled_lg_throttle_per_warp_active.pct,smsp__warp_issue_stalled_math_pipe_throttle_per_warp_active.pct,smsp__warp_issue_stalled_wait_per_warp_active.pct,smsp__warp_issue_stalled_drain_per_warp_active.pct,smsp__warp_issue_stalled_mio_throttle_per_warp_active.pct,smsp__warp_issue_stalled_short_scoreboard_per_warp_active.pct,smsp__warp_issue_stalled_not_selected_per_warp_active.pct,smsp__warp_issue_stalled_selected_per_warp_active.pct,smsp__warp_issue_stalled_barrier_per_warp_active.pct,smsp__warp_issue_stalled_membar_per_warp_active.pct,smsp__warp_issue_stalled_no_instruction_per_warp_active.pct,smsp__warp_issue_stalled_tex_throttle_per_warp_active.pct,smsp__warp_issue_stalled_imc_miss_per_warp_active.pct,smsp__warp_issue_stalled_branch_resolving_per_warp_active.pct,smsp__warp_issue_stalled_dispatch_stall_per_warp_active.pct,smsp__warp_issue_stalled_sleeping_per_warp_active.pct,smsp__inst_executed.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum \
  --csv --page details $PY experiments/ncu_cases.py "${T:-4096}" > "$OUT/ncu.csv" 2> "$OUT/ncu.err"
echo "ncu rc=$?"; tail -3 "$OUT/ncu.err"
$PY - "$OUT/ncu.csv" <<'PY'
import csv, sys, collections
rows = list(csv.DictReader(l for l in open(sys.argv[1]) if l.startswith('"')))
want = ["Duration", "DRAM Throughput", "Memory Throughput", "Compute (SM) Throughput", "Registers Per Thread",
        "Achieved Occupancy", "Theoretical Occupancy", "Issue Slots Busy", "Block Size", "Grid Size",
        "Warp Cycles Per Issued Instruction", "No Eligible", "L2 Hit Rate", "L1/TEX Hit Rate",
        "smsp__inst_executed.sum", "dram__bytes_read.sum", "dram__bytes_write.sum", "lts__t_bytes.sum"]
by = collections.OrderedDict()
for r in rows:
    k = (r["ID"], r["Kernel Name"][:70])
    by.setdefault(k, {})[r["Metric Name"]] = r["Metric Value"] + " " + r["Metric Unit"]
for (i, name), m in by.items():
    print(i, name)
    print("   " + "; ".join(f"{w}={m[w]}" for w in want if w in m))
    st = sorted(((float(v.split()[0].replace(",", "")), k.split("stalled_")[1].split("_per")[0]) for k, v in m.items()
                 if "stalled_" in k), reverse=True)
    print("   stalls%: " + " ".join(f"{n}={v:.0f}" for v, n in st[:6]))
PY
