"""Why do write-heavy kernels run below the copy? (diagnostic; not part of the package)

python experiments/diag_writes.py [writes] [widen] [placement] [bench] [temps] -> % of the copy
measured in the same run (bytes read + written) of
  * writes: pure writes of ~3 GiB and 400 MiB: torch zero_/fill_ (also on uint8), and a Triton
    store kernel with each store cache hint, at six output placements;
  * widen: a 1:2 stream (one int32 word read, two written) with each store hint;
  * placement / bench / temps: dequantize (T=32768, Llama-3-8B K) into outputs at four offsets:
    fresh buffers; with the bench's reference output also held; and with each output allocated
    after a reference check that made ~18 GiB of float temporaries (the bench's old check).
No arguments: writes, widen and all three dequantize orders. Importing ``bench`` turns on
torch's expandable segments unless PYTORCH_CUDA_ALLOC_CONF is set; the 84-86% "temps" effect
shows with the default allocator: run ``PYTORCH_CUDA_ALLOC_CONF= python experiments/diag_writes.py``.
"""
import sys

import torch
import triton
import triton.language as tl

from bench.harness import CopyBaseline, Timer
from kvkernels.formats import QuantFormat
from kvkernels.quant import dequantize_op, quantize_op


@triton.jit
def _fill(dst, n, v, BLOCK: tl.constexpr, HINT: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    val = tl.full([BLOCK], 0, tl.int32) + v
    if HINT == 0:
        tl.store(dst + offs, val, mask=offs < n)
    elif HINT == 1:
        tl.store(dst + offs, val, mask=offs < n, cache_modifier=".cs")
    elif HINT == 2:
        tl.store(dst + offs, val, mask=offs < n, eviction_policy="evict_first")
    elif HINT == 3:
        tl.store(dst + offs, val, mask=offs < n, cache_modifier=".wt")
    else:
        tl.store(dst + offs, val, mask=offs < n, cache_modifier=".cg")


@triton.jit
def _widen2(src, dst, n_in, BLOCK: tl.constexpr, HINT: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n_in
    v = tl.load(src + offs, mask=m, other=0)
    k = tl.arange(0, 2)
    p = dst + (offs[:, None] * 2 + k[None, :])
    w = v[:, None] + k[None, :]
    if HINT == 0:
        tl.store(p, w, mask=m[:, None])
    elif HINT == 1:
        tl.store(p, w, mask=m[:, None], cache_modifier=".cs")
    elif HINT == 2:
        tl.store(p, w, mask=m[:, None], eviction_policy="evict_first")
    elif HINT == 3:
        tl.store(p, w, mask=m[:, None], cache_modifier=".wt")
    else:
        tl.store(p, w, mask=m[:, None], cache_modifier=".cg")


HINTS = ["default", ".cs", "evict_first", ".wt", ".cg"]
timer = Timer("cuda", reps=20)
copy = CopyBaseline(timer)
MIB = 1 << 20
SHIFTS = (0, 2 * MIB, 3 * MIB, 64 * MIB, 301 * MIB, 1024 * MIB + 5 * MIB)


def pct(nbytes, us, c):
    return 100 * nbytes / us / 1e3 / c


def writes(nbytes_out):
    c_same = copy.gbps(nbytes_out)
    print(f"# writes of {nbytes_out / MIB:.0f} MiB; copy rate (same bytes moved) {c_same:.0f} GB/s, "
          f"per placement {copy.detail[nbytes_out // 2]}", flush=True)
    n = nbytes_out // 4
    for name in ["torch.zero_", "torch.fill_", "torch.fill_ uint8"] + [f"triton {h}" for h in HINTS]:
        res = []
        for shift in SHIFTS:
            buf = torch.empty(nbytes_out + shift, dtype=torch.uint8, device="cuda")
            out = buf[shift:].view(torch.int32)
            if name == "torch.zero_":
                fn = out.zero_
            elif name == "torch.fill_":
                fn = lambda: out.fill_(7)  # noqa: E731
            elif name == "torch.fill_ uint8":
                fn = lambda: buf[shift:].fill_(7)  # noqa: E731
            else:
                h = HINTS.index(name.split()[1])
                fn = lambda: _fill[(triton.cdiv(n, 4096),)](out, n, 7, BLOCK=4096, HINT=h, num_warps=8)  # noqa: E731
            us = timer(fn, graph=not name.startswith("torch.zero"))["median_us"]
            res.append(pct(nbytes_out, us, c_same))
            del buf, out, fn
        print(f"fill {name:18s} % of copy by placement: " + " ".join(f"{v:5.1f}" for v in res), flush=True)


def widen(nbytes_in):
    n = nbytes_in // 4
    src = torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32, device="cuda")
    c = copy.gbps(3 * nbytes_in)
    for hi, h in enumerate(HINTS):
        res = []
        for shift in SHIFTS[:4]:
            buf = torch.empty(2 * nbytes_in + shift, dtype=torch.uint8, device="cuda")
            dst = buf[shift:].view(torch.int32)
            fn = lambda: _widen2[(triton.cdiv(n, 2048),)](src, dst, n, BLOCK=2048, HINT=hi, num_warps=8)  # noqa: E731
            us = timer(fn)["median_us"]
            res.append(pct(3 * nbytes_in, us, c))
            del buf, dst
        print(f"widen 1:2 {h:12s} ({3 * nbytes_in / MIB:.0f} MiB moved) % of copy by placement: "
              + " ".join(f"{v:5.1f}" for v in res), flush=True)
    del src


def dequant(order):
    L, T, H, D = 32, 32768, 8, 128
    x = (torch.randn(L, T, H, D, device="cuda") * 2 + 0.5).to(torch.bfloat16)
    n = x.numel()
    for spec in ("fp8:token_head", "int4:g32:channel"):
        fmt = QuantFormat.parse(spec)
        codes = torch.empty(fmt.codes_shape(L, T, H, D), dtype=torch.uint8, device="cuda")
        scale = torch.empty(fmt.scale_shape(L, T, H, D), dtype=torch.float32, device="cuda")
        zero = torch.empty_like(scale) if fmt.has_zero else None
        quantize_op(x, spec, codes, scale, zero, True, "torch")
        keep = None
        if order != "placement":  # the bench holds out_ref too
            keep = torch.empty_like(x)
            dequantize_op(codes, scale, zero, spec, keep, "torch")
        nbytes = codes.numel() + scale.numel() * 4 * (2 if zero is not None else 1) + n * 2
        cg = copy.gbps(nbytes)
        for backend in ("cuda", "triton"):
            res = []
            for shift in SHIFTS[:4]:
                buf = torch.empty(n * 2 + shift, dtype=torch.uint8, device="cuda")
                out = buf[shift:].view(torch.bfloat16).view(L, T, H, D)
                if order == "temps":  # the bench's reference check: ~18 GiB of float temporaries
                    dequantize_op(codes, scale, zero, spec, out, backend)
                    assert (out.float() - keep.float()).abs().max().item() <= 2**-7 * keep.abs().max().item()
                us = timer(lambda: dequantize_op(codes, scale, zero, spec, out, backend))["median_us"]
                res.append(pct(nbytes, us, cg))
                del buf, out
            print(f"dequantize[{order}] {spec:18s} {backend:6s} % of copy by output placement: "
                  + " ".join(f"{v:5.1f}" for v in res), flush=True)
        del codes, scale, zero, keep
    del x
    torch.cuda.empty_cache()


if __name__ == "__main__":
    what = sys.argv[1:] or ["writes", "widen", "dequant"]  # "dequant": all three orders
    print("#", torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    if "writes" in what:
        writes(3072 * MIB)
        writes(400 * MIB)
    if "widen" in what:
        widen(1024 * MIB)
    for order in ("placement", "bench", "temps"):
        if order in what or "dequant" in what:
            dequant(order)
    # the copy again at the end: drift (clocks, temperature) over the run
    copy.cache.clear()
    print(f"# copy 3 GiB at the end: {copy.gbps(3072 * MIB):.0f} GB/s {copy.detail[1536 * MIB]}", flush=True)
