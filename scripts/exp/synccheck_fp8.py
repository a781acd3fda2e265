"""Run the one-pass fp8 kernel on shapes whose warps straddle layers (lanes of one warp reduce
different keys), on one-layer steps (the UNI variant) and on block groups (layers and heads of
>= 4096 vectors: (6, 1024, 3, 64), (3, 600, 8, 128); KVK_FP8_LAG=0 for the lag-0 pipeline), for
compute-sanitizer --tool synccheck / racecheck; compares with the reference.
    compute-sanitizer --tool synccheck python3 scripts/exp/synccheck_fp8.py
"""
import torch

import kvkernels as kk

torch.manual_seed(0)
bad = 0
for shape in [(300, 33, 3, 64), (5, 21, 3, 64), (3, 2113, 8, 128), (2, 8500, 4, 64), (2, 2120, 4, 256),
              (6, 1024, 3, 64), (3, 600, 8, 128)]:
    for spec in ["fp8:tensor", "fp8:head"]:
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        q = kk.quantize(x, spec, backend="cuda")
        r = kk.quantize(x, spec, backend="torch")
        ok = torch.equal(q.codes, r.codes) and torch.equal(q.scale, r.scale)
        bad += not ok
        print(shape, spec, "ok" if ok else "MISMATCH", flush=True)
print("mismatches:", bad)
