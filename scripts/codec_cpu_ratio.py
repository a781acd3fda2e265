"""One-core throughput of the CPU coders as a ratio to torchac, measured alternately in one process
(robust to a shared, noisy machine: each repetition times torchac and every coder back to back,
the ratio is taken per repetition, the median over repetitions is reported).

    PYTHONPATH=. taskset -c 0 python3 scripts/codec_cpu_ratio.py [--reps 7] [--layers 2] [--tokens 1024]

Case: bench/cases/codec.py make_case (Llama-3-8B shapes, 256-token chunks, tables per (kind,
layer, channel)); torchac (test/bench-only oracle) on the first 2^19 symbols in stream order with
one CDF row per symbol (its native interface). Times are CPU time (time.process_time) and wall
time (time.perf_counter); `KVK_CODEC_CPU_ISA=generic` forces the portable C++ path.
"""
import argparse
import statistics
import time

import torch

from bench.cases.codec import PB, make_case
from kvkernels.codec import coders as K
from kvkernels.reference import codec as R

ap = argparse.ArgumentParser()
ap.add_argument("--reps", type=int, default=7)
ap.add_argument("--layers", type=int, default=2)
ap.add_argument("--tokens", type=int, default=1024)
ap.add_argument("--no-torchac", action="store_true")
args = ap.parse_args()
assert R.cpu_coder_available(), "kvkernels._codec_cpu is not built (scripts/build_codec_cpu.sh)"
torch.set_num_threads(1)

c = make_case(args.layers, args.tokens, 8, 128, "cpu")
sym, freq, cdf, tid = c["sym"], c["freq"], c["cdf"], c["tid"]
S, N, C = c["S"], c["N"], c["C"]
n = sym.numel()
pl, off = K.rans_encode(sym, freq, tid, PB)
apl, aoff = K.ac_encode(sym, cdf, tid)
assert torch.equal(K.rans_decode(pl, off, freq, tid, N, PB), sym)
assert torch.equal(K.ac_decode(apl, aoff, cdf, tid, N), sym)
want_dq = R.dequant_spec(sym, tid, c["lut"], c["s_tok"], None, None).to(torch.bfloat16)
assert torch.equal(K.rans_decode_dequant(pl, off, freq, tid, N, PB, c["lut"], c["s_tok"]), want_dq)
ours = {
    "rans_decode": lambda: K.rans_decode(pl, off, freq, tid, N, PB),
    "rans_decode_dequant": lambda: K.rans_decode_dequant(pl, off, freq, tid, N, PB, c["lut"], c["s_tok"]),
    "rans_encode": lambda: K.rans_encode(sym, freq, tid, PB),
    "ac_decode": lambda: K.ac_decode(apl, aoff, cdf, tid, N),
    "ac_encode": lambda: K.ac_encode(sym, cdf, tid),
}
peer = {}
m = 1 << 19
if not args.no_torchac:
    import torchac  # bench/test-only oracle (GPL), never imported by the package

    s16 = sym.permute(0, 2, 1).reshape(-1)[:m]
    rows = tid.reshape(S, C, 1).expand(S, C, N).reshape(-1)[:m].long()
    cd = cdf[rows]
    cd16 = torch.where(cd > 32767, cd - 65536, cd).to(torch.int16)
    s16 = s16.to(torch.int16)
    data = torchac.encode_int16_normalized_cdf(cd16, s16)
    assert torch.equal(torchac.decode_int16_normalized_cdf(cd16, data).to(torch.int16), s16)
    peer = {"torchac_decode": lambda: torchac.decode_int16_normalized_cdf(cd16, data),
            "torchac_encode": lambda: torchac.encode_int16_normalized_cdf(cd16, s16)}


def once(fn, count):
    t0, w0 = time.process_time(), time.perf_counter()
    fn()
    t1, w1 = time.process_time(), time.perf_counter()
    return count / max(t1 - t0, 1e-9) / 1e6, count / (w1 - w0) / 1e6


for fn in list(ours.values()) + list(peer.values()):
    fn()  # warm
res = {k: ([], []) for k in list(ours) + list(peer)}
for _ in range(args.reps):
    for k, fn in list(peer.items()) + list(ours.items()):
        cpu, wall = once(fn, m if k.startswith("torchac") else n)
        res[k][0].append(cpu)
        res[k][1].append(wall)
print(f"case: L={args.layers} T={args.tokens} S={S} N={N} C={C} symbols={n}; torchac on {m} symbols; "
      f"reps={args.reps}")
for k, (cpu, wall) in res.items():
    line = f"{k:22s} {statistics.median(cpu):8.1f} Msym/s cpu  {statistics.median(wall):8.1f} Msym/s wall"
    if peer:
        ref = "torchac_encode" if k.endswith("encode") else "torchac_decode"
        ratios = [a / b for a, b in zip(cpu, res[ref][0])]
        line += f"   x torchac (cpu, per-rep median) {statistics.median(ratios):7.1f}  [{min(ratios):.1f}..{max(ratios):.1f}]"
    print(line)
