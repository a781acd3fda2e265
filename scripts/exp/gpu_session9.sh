set -u
export PYTHONPATH=$PWD
t0=$(date +%s)
BENCH=0 bash scripts/gpu_check.sh $OUT/check tests/test_quant.py -k "computed_scale_special or dense" > $OUT/check.txt 2>&1
grep -E "build rc|passed|failed" $OUT/check.txt | tail -3
grep -E "^FAILED|^ERROR|Error" $OUT/check/pytest.log | head -20
rm -f $OUT/check/junit.xml $OUT/check/build.txt
echo "== t=$(( $(date +%s) - t0 ))s harness"
nvcc -arch=sm_90 -std=c++17 -O3 -Icsrc scripts/exp/tok_dq_exp.cu -o /tmp/tokdq && timeout 90 /tmp/tokdq
echo "== t=$(( $(date +%s) - t0 ))s head split"
bash scripts/exp/ab_values.sh $OUT KVK_FP8_HEAD_SPLIT "0 1" "fp8:head" 32768
echo "== t=$(( $(date +%s) - t0 ))s tpt"
bash scripts/exp/ab_values.sh $OUT KVK_TOK_DQ_TPT "32 16 8" "int4:g32:token int2:g32:token" "4096 32768"
echo "== t=$(( $(date +%s) - t0 ))s done"
