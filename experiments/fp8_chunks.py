"""Two-pass fp8 tensor quantize run over chunks of k layers (amax + quantize per chunk), timed as
graph replays with the bench's Timer: does the second read hit L2? Private experiment behind
bench/results/fp8-resident-h200-2026-11-27.txt; on a GPU: PYTHONPATH=. python3 experiments/fp8_chunks.py
"""
import torch
from bench.harness import Timer, CopyBaseline
from kvkernels.formats import QuantFormat
from kvkernels.quant import quantize_op

timer = Timer("cuda")
copy = CopyBaseline(timer)
spec = "fp8:tensor"
fmt = QuantFormat.parse(spec)
for (L, T, H, D) in [(32, 4096, 8, 128), (30, 4096, 3, 64)]:
    x = (torch.randn(L, T, H, D, device="cuda") * 2 + 0.5).to(torch.bfloat16)
    codes = torch.empty(fmt.codes_shape(L, T, H, D), dtype=torch.uint8, device="cuda")
    scale = torch.empty(fmt.scale_shape(L, T, H, D), dtype=torch.float32, device="cuda")
    nbytes = x.numel() * 2 + codes.numel() + scale.numel() * 4
    cg = copy.gbps(nbytes)
    for backend in ("cuda", "triton"):
        for k in (1, 2, 3, 4, 6, 8, L):
            def fn():
                for l0 in range(0, L, k):
                    quantize_op(x[l0:l0 + k], spec, codes[l0:l0 + k], scale[l0:l0 + k], None, True, backend)
            t = timer(fn)["median_us"]
            print(f"{backend:6s} L={L} T={T} H={H} D={D} chunk={k:2d} layers ({k*T*H*D*2/2**20:5.1f} MiB x) "
                  f"{t:8.1f} us {nbytes / t / 1e3 / cg * 100:6.1f}% of copy", flush=True)
