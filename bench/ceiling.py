"""The data-movement ceiling of a read:write mix, measured on the device in the same run.

A device-to-device copy reads and writes equal amounts. Ops that mostly write (dequantize: 1-2
bytes of codes in, 2 bytes out per element) or mostly read (quantize) move a different mix, and
HBM does not serve every mix at the copy's rate (on an H200: a pure write of 4-byte words ran at
105-109% of the copy's rate, a 1:2 read:write stream at 93%; scripts/diag_writes.py). ``MixCeiling.gbps(read, written)`` times a Triton kernel that only moves data
in about that ratio (each 4-byte word read is written K times, or K words read are XOR-folded
into one written word) and returns its GB/s, read + written: a kernel that moves the same mix
cannot be expected to beat it by much.
"""
from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - triton is a dependency; CPU runs skip the ceiling
    triton = None

if triton is not None:

    @triton.jit
    def _widen(src, dst, n_in, K: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n_in
        v = tl.load(src + offs, mask=m, other=0)
        k = tl.arange(0, K)
        tl.store(dst + (offs[:, None] * K + k[None, :]), v[:, None] + k[None, :] * 0, mask=m[:, None])

    @triton.jit
    def _narrow(src, dst, n_out, K: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n_out
        k = tl.arange(0, K)
        v = tl.load(src + (offs[:, None] * K + k[None, :]), mask=m[:, None], other=0)
        tl.store(dst + offs, tl.xor_sum(v, axis=1), mask=m)


class MixCeiling:
    def __init__(self, timer):
        self.timer, self.cache = timer, {}

    def gbps(self, read: int, written: int):
        if triton is None or self.timer.device != "cuda" or read <= 0 or written <= 0:
            return None
        widen = written >= read
        ratio = written / read if widen else read / written
        k = 1 << max(0, min(4, round(math.log2(ratio))))  # nearest power of two (tl.arange), <= 16
        n_small = max(1, min(read, written) // 4)  # words on the small side
        key = (widen, k, n_small)
        if key not in self.cache:
            a = torch.randint(-2**31, 2**31 - 1, (n_small * (1 if widen else k),), dtype=torch.int32, device="cuda")
            b = torch.empty(n_small * (k if widen else 1), dtype=torch.int32, device="cuda")
            block = 1024
            grid = (triton.cdiv(n_small, block),)
            if widen:
                fn = lambda: _widen[grid](a, b, n_small, K=k, BLOCK=block)  # noqa: E731
            else:
                fn = lambda: _narrow[grid](a, b, n_small, K=k, BLOCK=block)  # noqa: E731
            t = self.timer(fn)["median_us"]
            self.cache[key] = (a.numel() + b.numel()) * 4 / t / 1e3
            del a, b
        return self.cache[key]
