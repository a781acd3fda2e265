"""Memory ceilings of this GPU for read/write mixes (diagnostic; not part of the package).

python experiments/mem_ceilings.py -> rates in GB/s (bytes read + written) for a copy (1:1), a pure
write (fill), a pure read (sum), and widening casts uint8->bf16 (1:2) and uint8->fp32 (1:4), at
~400 MiB and ~3 GiB moved, timed like the bench (graph replay where possible, L2 flushed).
"""
import torch

from bench.harness import Timer

t = Timer("cuda", reps=20)
for mib in (400, 3072):
    n = (mib << 20) // 2
    a = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    sink = torch.zeros((), dtype=torch.int64, device="cuda")
    b32 = b.view(torch.int32)  # (torch's uint8 fill kernel writes at ~78% of copy: fill 4-byte words)
    rows = {"copy 1:1": (lambda: b.copy_(a), 2 * n, False), "fill 0:1": (lambda: b32.fill_(7), n, True)}
    ai = a.view(torch.int32)
    rows["sum 1:0"] = (lambda: torch.sum(ai, dim=0, out=sink), n, True)
    m = n // 3
    c8, c16 = a[:m], torch.empty(m, dtype=torch.bfloat16, device="cuda")
    rows["cast u8->bf16 1:2"] = (lambda: c16.copy_(c8), 3 * m, True)
    m5 = n // 5
    d8, d32 = a[:m5], torch.empty(m5, dtype=torch.float32, device="cuda")
    rows["cast u8->f32 1:4"] = (lambda: d32.copy_(d8), 5 * m5, True)
    for name, (fn, nbytes, graph) in rows.items():
        us = t(fn, graph=graph)["median_us"]
        print(f"{mib:5d} MiB  {name:18s} {nbytes / us / 1e3:8.0f} GB/s")
    del a, b, c8, c16, d8, d32
