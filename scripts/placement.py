"""Does buffer placement move a kernel's bandwidth? (diagnostic; not part of the package)

python scripts/placement.py -> dequantize at T=32768 (Llama-3-8B K) into outputs placed at three
offsets inside one allocation, per backend: GB/s and % of the (best-placement) copy baseline.
"""
import torch

from bench.harness import CopyBaseline, Timer
from kvkernels.formats import QuantFormat
from kvkernels.quant import dequantize_op, quantize_op

timer = Timer("cuda", reps=20)
copy = CopyBaseline(timer)
L, T, H, D = 32, 32768, 8, 128
x = (torch.randn(L, T, H, D, device="cuda") * 2 + 0.5).to(torch.bfloat16)
n = x.numel()
for spec in ("fp8:token_head", "int4:g32:channel"):
    fmt = QuantFormat.parse(spec)
    codes = torch.empty(fmt.codes_shape(L, T, H, D), dtype=torch.uint8, device="cuda")
    scale = torch.empty(fmt.scale_shape(L, T, H, D), dtype=torch.float32, device="cuda")
    zero = torch.empty_like(scale) if fmt.has_zero else None
    quantize_op(x, spec, codes, scale, zero, True, "torch")
    nbytes = codes.numel() + scale.numel() * 4 * (2 if zero is not None else 1) + n * 2
    cg = copy.gbps(nbytes)
    for backend in ("cuda", "triton"):
        res = []
        for shift in (0, 3 << 20, 37 << 20, 301 << 20):
            buf = torch.empty(n * 2 + shift, dtype=torch.uint8, device="cuda")
            out = buf[shift:].view(torch.bfloat16).view(L, T, H, D)
            t = timer(lambda: dequantize_op(codes, scale, zero, spec, out, backend))["median_us"]
            res.append(100 * nbytes / t / 1e3 / cg)
            del buf, out
        print(f"dequantize {spec:18s} {backend:6s} % of copy by output placement: "
              + " ".join(f"{v:5.1f}" for v in res), flush=True)
    del codes, scale, zero
