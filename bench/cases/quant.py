"""Bench cases for ``quantize`` and ``dequantize``.

Bytes moved (the floor): quantize reads ``n * in_size`` and writes ``n * bits / 8`` of codes plus
4 bytes per scale and zero point; dequantize reads those and writes ``n * out_size``.
"""
from __future__ import annotations

import functools
import math

import torch

from kvkernels import dispatch
from kvkernels.formats import QuantFormat
from kvkernels.quant import dequantize_op, quantize_op

from ..ceiling import MixCeiling

# output placements tried per row: byte offsets of the large output inside one allocation
PLACEMENTS = (0, 3 << 20, 37 << 20)
# (model, L, H, D); T varies
MODELS = {"llama3-8b": (32, 8, 128), "smollm2-135m": (30, 3, 64)}
GPU_SIZES = [("llama3-8b", 4096), ("llama3-8b", 32768), ("smollm2-135m", 4096)]
CPU_SIZES = [("smollm2-135m", 256)]
# "+given": fp8 with a given (calibrated) scale, one pass; plain fp8 tensor/head compute the scale
# (a grid-wide amax per layer or per (layer, head) before any code can be written).
FORMATS = ["fp8:token_head", "fp8:tensor", "fp8:tensor+given", "fp8:head", "fp8:head+given",
           "int8:g64:channel", "int4:g32:channel", "int2:g32:channel", "int4:g32:token", "int2:g32:token"]


def _bufs(fmt, L, T, H, D, device):
    codes = torch.empty(fmt.codes_shape(L, T, H, D), dtype=torch.uint8, device=device)
    scale = torch.empty(fmt.scale_shape(L, T, H, D), dtype=torch.float32, device=device)
    zero = torch.empty_like(scale) if fmt.has_zero else None
    return codes, scale, zero


# Elements per slice of the torch reference: its float32 temporaries and fma32's float64 ones (~10
# tensors of the slice's size) stay ~3 GiB however large the row. The whole-size reference of a
# T=32768 Llama layer set (1.07e9 elements) ran out of an H100's 80 GB (2026-12-07).
REF_CHUNK = 1 << 25


def _layer_slices(fmt, L, T, H, D):
    """Slices of whole layers, ~REF_CHUNK elements each. Every format's scale groups lie inside
    one layer (the scale's first dim is L), so the reference over the slices equals the
    reference over the whole tensor bit for bit: the same strictness, bounded memory."""
    assert fmt.scale_shape(L, T, H, D)[0] == L, fmt
    step = max(1, REF_CHUNK // (T * H * D))
    return [slice(a, min(a + step, L)) for a in range(0, L, step)]


def _reference(x, spec, fmt, device):
    """codes / scale / zero and the bf16 decode of the torch reference, a few layers at a time."""
    L, T, H, D = x.shape
    codes, scale, zero = _bufs(fmt, L, T, H, D, device)
    out = torch.empty_like(x)
    for s in _layer_slices(fmt, L, T, H, D):
        z = None if zero is None else zero[s]
        quantize_op(x[s], spec, codes[s], scale[s], z, True, "torch")
        dequantize_op(codes[s], scale[s], z, spec, out[s], "torch")
    return codes, scale, zero, out


def _close(out, want) -> bool:
    """|out - want| <= 2^-7 max|want|, a layer at a time (no full-size float temporaries)."""
    tol = 2**-7 * max(w.abs().max().item() for w in want)
    return all((o.float() - w.float()).abs().max().item() <= tol for o, w in zip(out, want))


def _meta_bytes(fmt, L, T, H, D):
    return math.prod(fmt.scale_shape(L, T, H, D)) * 4 * (2 if fmt.has_zero else 1)


def run(args, timer, copy, info, op_names):
    device = args.device
    sizes = GPU_SIZES if device == "cuda" else CPU_SIZES
    if args.tokens:
        sizes = [(m, t) for m in {m for m, _ in sizes} for t in args.tokens]
    formats = args.formats or FORMATS
    rows = []
    mix = MixCeiling(timer)
    for model, T in sizes:
        L, H, D = MODELS[model]
        x = torch.randn(L, T, H, D, device=device).mul_(2).add_(0.5).to(torch.bfloat16)
        n = x.numel()
        for name in formats:
            spec, _, variant = name.partition("+")
            compute = variant != "given"
            fmt = QuantFormat.parse(spec)
            try:
                fmt.check_shape(T, H, D)
            except ValueError:
                continue
            codes_ref, scale_ref, zero_ref, out_ref = _reference(x, spec, fmt, device)
            mb = _meta_bytes(fmt, L, T, H, D)
            # (read, written) bytes
            rw = {"quantize": (n * 2 + (0 if compute else mb), n * fmt.bits // 8 + (mb if compute else 0)),
                  "dequantize": (n * fmt.bits // 8 + mb, n * 2)}
            nbytes = {op: r + w for op, (r, w) in rw.items()}
            for backend in args.backends:
                for op in op_names:
                    why = dispatch.refusal(op, backend, x, fmt)
                    row = dict(op=op, format=name, backend=backend, model=model, L=L, T=T, H=H, D=D,
                               dtype="bfloat16", bytes=nbytes[op], **info)
                    if why:
                        rows.append({**row, "status": f"refused: {why}"})
                        continue
                    # The op's large output at three placements (offsets in one allocation); the
                    # row reports the best, like the copy baseline, and keeps every placement's
                    # time: on an H200 the same dequantize ran at 84% or 93% of copy depending
                    # only on where its output buffer sat (scripts/diag_writes.py placement).
                    times, ok = [], True
                    for shift in PLACEMENTS:
                        codes, scale, zero = _bufs(fmt, L, T, H, D, device)
                        if not compute:
                            scale.copy_(scale_ref)
                        big = torch.empty((codes.numel() if op == "quantize" else 2 * n) + shift,
                                          dtype=torch.uint8, device=device)
                        if op == "quantize":
                            codes = big[shift:].view(codes.shape)
                            fn = functools.partial(quantize_op, x, spec, codes, scale, zero, compute, backend)
                        else:
                            out = big[shift:].view(torch.bfloat16).view(x.shape)
                            fn = functools.partial(dequantize_op, codes_ref, scale_ref, zero_ref, spec, out, backend)
                        fn()  # reference check before timing
                        if op == "quantize":
                            ok = ok and torch.equal(codes, codes_ref) and torch.equal(scale, scale_ref)
                        else:
                            ok = ok and _close(out, out_ref)
                        times.append(timer(fn))
                        del codes, scale, zero, big, fn
                        if device != "cuda":
                            break
                    t = min(times, key=lambda v: v["median_us"])
                    gbps = nbytes[op] / t["median_us"] / 1e3
                    cgbps = copy.gbps(nbytes[op])
                    mgbps = mix.gbps(*rw[op])
                    rows.append({**row, **t, "GBps": gbps, "copy_GBps": cgbps, "pct_copy": 100 * gbps / cgbps,
                                 "median_us_placements": [v["median_us"] for v in times],
                                 "copy_GBps_placements": copy.detail.get(max(nbytes[op] // 2, 1)),
                                 "mix_GBps": mgbps, "pct_mix": 100 * gbps / mgbps if mgbps else None,
                                 "check": "ok" if ok else "MISMATCH", "status": "ran"})
                    print(_fmt_row(rows[-1]), flush=True)
            del codes_ref, scale_ref, zero_ref, out_ref
            if device == "cuda":  # each format's buffers (and graph pools) go before the next's
                torch.cuda.empty_cache()
        del x
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _fmt_row(r):
    mix = f"  mix ceiling {100 * r['mix_GBps'] / r['copy_GBps']:5.1f}% of copy" if r.get("mix_GBps") else ""
    return (f"{r['op']:10s} {r['format']:18s} {r['backend']:6s} {r['model']:12s} T={r['T']:<6d} "
            f"{r['bytes'] / 2**20:9.1f} MiB {r['median_us']:10.1f} us {r['GBps']:8.1f} GB/s "
            f"{r['pct_copy']:5.1f}% of copy  {r['check']}{mix}")


CASES = {"quantize": run, "dequantize": run}
FAMILY = "quant"
