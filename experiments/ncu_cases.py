"""Run a few quantize/dequantize cases once each (after one warm-up) for Nsight Compute.

python experiments/ncu_cases.py [T] -- used by experiments/ncu_quant.sh; not part of the package.
"""
import os
import sys

import torch

from kvkernels.formats import QuantFormat
from kvkernels.quant import dequantize_op, quantize_op

T = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
L, H, D = 32, 8, 128
if os.environ.get("NCU_SHAPE"):  # "L,H,D", e.g. SmolLM2's "30,3,64"
    L, H, D = (int(v) for v in os.environ["NCU_SHAPE"].split(","))

CASES = [("quantize", "int4:g32:channel"), ("quantize", "int8:g64:channel"), ("quantize", "fp8:token_head"),
         ("quantize", "int4:g32:token"), ("quantize", "fp8:tensor"), ("dequantize", "int2:g32:channel"),
         ("dequantize", "int4:g32:token")]
if os.environ.get("NCU_CASES"):  # e.g. "quantize:int4:g32:token,dequantize:fp8:token_head"
    CASES = [tuple(c.split(":", 1)) for c in os.environ["NCU_CASES"].split(",")]
BACKENDS = os.environ.get("NCU_BACKENDS", "cuda,triton").split(",")
x = (torch.randn(L, T, H, D, device="cuda") * 2 + 0.5).to(torch.bfloat16)
for op, spec in CASES:
    fmt = QuantFormat.parse(spec)
    codes = torch.empty(fmt.codes_shape(L, T, H, D), dtype=torch.uint8, device="cuda")
    scale = torch.empty(fmt.scale_shape(L, T, H, D), dtype=torch.float32, device="cuda")
    zero = torch.empty_like(scale) if fmt.has_zero else None
    quantize_op(x, spec, codes, scale, zero, True, "torch")
    out = torch.empty_like(x)
    for backend in BACKENDS:
        for _ in range(2):
            if op == "quantize":
                quantize_op(x, spec, codes, scale, zero, True, backend)
            else:
                dequantize_op(codes, scale, zero, spec, out, backend)
    torch.cuda.synchronize()
print("done")
