"""fp8 tensor/head quantize with computed scales: one launch (re-read from L2) vs two passes
(diagnostic; not part of the package).

python scripts/diag_fp8_pass.py [T ...] -> % of copy for bf16 [32, T, 8, 128] (Llama-3-8B K) per
backend and path, the one-pass path also forced where a layer does not fit in L2. The CUDA
kernel's tile size and lag come from KVK_FP8_NCH (1, 2 or 4 chunks per thread) and KVK_FP8_LAG
(1-4), read once per process; the Triton kernel's are swept here.
"""
import os
import sys

import torch

from bench.harness import CopyBaseline, Timer
from kvkernels.formats import QuantFormat
from kvkernels.quant import quantize_op
from kvkernels.triton_kernels import quant as tq

timer = Timer("cuda", reps=20)
copy = CopyBaseline(timer)
L, H, D = 32, 8, 128
for T in [int(a) for a in sys.argv[1:]] or [4096, 32768]:
    x = (torch.randn(L, T, H, D, device="cuda") * 2 + 0.5).to(torch.bfloat16)
    for spec in ("fp8:tensor", "fp8:head"):
        fmt = QuantFormat.parse(spec)
        ref_codes = torch.empty(fmt.codes_shape(L, T, H, D), dtype=torch.uint8, device="cuda")
        ref_scale = torch.empty(fmt.scale_shape(L, T, H, D), device="cuda")
        quantize_op(x, spec, ref_codes, ref_scale, None, True, "torch")
        codes, scale = torch.empty_like(ref_codes), torch.empty_like(ref_scale)
        nbytes = x.numel() * 2 + codes.numel() + scale.numel() * 4
        c = copy.gbps(nbytes)
        variants = [("cuda", "0", None), ("cuda", "1", None)]
        if os.environ.get("DIAG_TRITON", "1") == "1":
            variants += [("triton", "0", None)] + [("triton", "1", (e, g)) for e in (8192, 16384) for g in (1, 2, 3)]
        for backend, one, elems in variants:
            os.environ["KVKERNELS_FP8_ONE_PASS"] = one
            if elems:
                tq.CONFIG["q_fp8_pass"] = dict(elems=elems[0], warps=8, lag=elems[1])
            codes.fill_(0xAB)
            quantize_op(x, spec, codes, scale, None, True, backend)
            ok = torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)
            us = timer(lambda: quantize_op(x, spec, codes, scale, None, True, backend))["median_us"]
            tag = f"{backend} {'one-pass' if one == '1' else 'two-pass'}" + (f" elems={elems}" if elems else "")
            nch = (f"NCH={os.environ.get('KVK_FP8_NCH', '2')} lag={os.environ.get('KVK_FP8_LAG', '1')}"
                   if backend == "cuda" and one == "1" else "")
            print(f"T={T:6d} {spec:11s} {tag:34s} {nch:13s} {us:8.1f} us "
                  f"{100 * nbytes / us / 1e3 / c:5.1f}% of copy  {'ok' if ok else 'MISMATCH'}", flush=True)
        os.environ.pop("KVKERNELS_FP8_ONE_PASS")
    del x
    torch.cuda.empty_cache()
