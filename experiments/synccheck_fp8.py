"""Run the one-pass fp8 kernel on shapes whose warps straddle layers (lanes of one warp reduce
different keys), on one-layer steps (the UNI variant) and on block groups (layers and heads of
>= 4096 vectors: (6, 1024, 3, 64), (3, 600, 8, 128); KVK_FP8_LAG=0 for the lag-0 pipeline), for
compute-sanitizer --tool synccheck / racecheck; compares with the reference.
    compute-sanitizer --tool synccheck python3 experiments/synccheck_fp8.py [backend]
backend: cuda (default) or triton (the Gluon one-pass kernel, _q_fp8_resident_gl; its shapes
add (2, 4096, 8, 128): 32 warps a program for the tensor scope, 8 for the heads, and
(4, 4096, 3, 64): 16 warps a program).
"""
import sys

import torch

import kvkernels as kk

torch.manual_seed(0)
backend = sys.argv[1] if len(sys.argv) > 1 else "cuda"
shapes = [(300, 33, 3, 64), (5, 21, 3, 64), (3, 2113, 8, 128), (2, 8500, 4, 64), (2, 2120, 4, 256),
          (6, 1024, 3, 64), (3, 600, 8, 128)]
if backend == "triton":
    shapes = [(3, 600, 8, 128), (2, 8500, 4, 64), (2, 4096, 8, 128), (4, 4096, 3, 64)]
bad = 0
for shape in shapes:
    for spec in ["fp8:tensor", "fp8:head"]:
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        q = kk.quantize(x, spec, backend=backend)
        r = kk.quantize(x, spec, backend="torch")
        ok = torch.equal(q.codes, r.codes) and torch.equal(q.scale, r.scale)
        bad += not ok
        print(shape, spec, "ok" if ok else "MISMATCH", flush=True)
print("mismatches:", bad)
