"""CPU-time (process_time) throughput of the CPU coders vs torchac, one core: robust to a shared,
overloaded machine where wall-clock bench rows are not. PYTHONPATH=. taskset -c 0 python3 scripts/codec_cpu_time.py"""
import time, torch
from bench.cases.codec import make_case, PB
from kvkernels.codec import coders as K
from kvkernels.reference import codec as R
import torchac
c = make_case(2, 1024, 8, 128, "cpu")
sym, freq, cdf, tid = c["sym"], c["freq"], c["cdf"], c["tid"]
S, N, C = c["S"], c["N"], c["C"]; n = sym.numel()
def cpu(fn, r=3):
    fn(); best = 1e9
    for _ in range(r):
        t0 = time.process_time(); fn(); best = min(best, time.process_time() - t0)
    return best
pl, off = K.rans_encode(sym, freq, tid, PB); apl, aoff = K.ac_encode(sym, cdf, tid)
res = {}
for name, fn in [("rans_encode", lambda: K.rans_encode(sym, freq, tid, PB)), ("rans_decode", lambda: K.rans_decode(pl, off, freq, tid, N, PB)),
                 ("rans_decode_dequant", lambda: K.rans_decode_dequant(pl, off, freq, tid, N, PB, c["lut"], c["s_tok"])),
                 ("ac_encode", lambda: K.ac_encode(sym, cdf, tid)), ("ac_decode", lambda: K.ac_decode(apl, aoff, cdf, tid, N))]:
    res[name] = n / cpu(fn) / 1e6
m = 1 << 19
s16 = sym.permute(0, 2, 1).reshape(-1)[:m]
rows = tid.reshape(S, C, 1).expand(S, C, N).reshape(-1)[:m].long()
cd = cdf[rows]; cd16 = torch.where(cd > 32767, cd - 65536, cd).to(torch.int16); s16 = s16.to(torch.int16)
data = torchac.encode_int16_normalized_cdf(cd16, s16)
res["torchac_encode"] = m / cpu(lambda: torchac.encode_int16_normalized_cdf(cd16, s16), 2) / 1e6
res["torchac_decode"] = m / cpu(lambda: torchac.decode_int16_normalized_cdf(cd16, data), 2) / 1e6
for k, v in res.items(): print(f"{k:22s} {v:8.1f} Msym/s (CPU time)  {2*v/1e3:.3f} GB/s-bf16")
