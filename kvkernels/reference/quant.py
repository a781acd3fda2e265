"""Torch reference for ``quantize`` / ``dequantize`` (the executable spec; also the CPU path).

Every backend implements the same two functions with the same arguments:

* ``quantize_into(x, fmt, codes, scale, zero, compute_scale)``
  - ``x``: ``[L, T, H, D]`` bf16/fp16/fp32, ``x.stride(-1) == 1``, other strides arbitrary.
  - ``codes``: contiguous ``uint8 [L, T, H, D*bits/8]`` (written).
  - ``scale``/``zero``: contiguous float32 of ``fmt.scale_shape(L, T, H, D)`` (written;
    for fp8 with ``compute_scale=False`` the scale is read instead). ``zero`` is None for fp8.
* ``dequantize_into(codes, scale, zero, fmt, out)``
  - ``out``: ``[L, T, H, D]`` bf16/fp16/fp32, ``out.stride(-1) == 1`` (written).

See docs/quant-spec.md for the math.
"""
from __future__ import annotations

import torch

from ..formats import FP8_MAX, QuantFormat


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., D]`` (< 2**bits) -> ``[..., D*bits/8]``, first code in the low bits."""
    if bits == 8:
        return q
    k = 8 // bits
    q = q.reshape(*q.shape[:-1], q.shape[-1] // k, k).to(torch.int32)
    shifts = torch.arange(k, device=q.device, dtype=torch.int32) * bits
    return (q << shifts).sum(-1).to(torch.uint8)


def _unpack(c: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`_pack`: ``[..., D*bits/8]`` uint8 -> ``[..., D]`` int32."""
    if bits == 8:
        return c.to(torch.int32)
    k = 8 // bits
    shifts = torch.arange(k, device=c.device, dtype=torch.int32) * bits
    q = (c.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return q.reshape(*c.shape[:-1], c.shape[-1] * k)


FLT_MAX = torch.finfo(torch.float32).max
FLT_MIN = torch.finfo(torch.float32).tiny  # 2^-126


def _recip(num, den: torch.Tensor) -> torch.Tensor:
    """min(num / den, FLT_MAX) with IEEE division (a tensor numerator: torch on CUDA turns
    division by a Python scalar into a multiply by its reciprocal, which is not IEEE)."""
    return (torch.full_like(den, float(num)) / den).clamp_(max=FLT_MAX)


INV_MAX = 2.0 ** 126  # the clamp of inv = qmax / range: 1 / FLT_MIN


def _int_group_params(xg: torch.Tensor, qmax: int, dim):
    """One group's constants over ``dim`` (docs/quant-spec.md, "Integer formats"): the finite
    values' min / max (0, 0 if none), the range pre-scale ``p`` (0.5 where ``mx - mn`` overflows
    float32, else 1), ``scale`` (>= FLT_MIN unless 0), ``inv`` (0 where scale == 0) and ``zero``."""
    fin = torch.isfinite(xg)
    inf = torch.full_like(xg, float("inf"))
    mn = torch.where(fin, xg, inf).amin(dim=dim, keepdim=True)
    mx = torch.where(fin, xg, -inf).amax(dim=dim, keepdim=True)
    none = mn > mx  # no finite value: +inf > -inf
    mn = torch.where(none, torch.zeros_like(mn), mn)
    mx = torch.where(none, torch.zeros_like(mx), mx)
    p = torch.where(torch.isinf(mx - mn), torch.full_like(mn, 0.5), torch.ones_like(mn))
    mnp = mn * p
    rngp = mx * p - mnp
    scale = (rngp / torch.full_like(rngp, float(qmax))) / p  # / p: exact (x 2 or x 1)
    scale = torch.where((scale > 0) & (scale < FLT_MIN), torch.full_like(scale, FLT_MIN), scale)
    inv = (torch.full_like(rngp, float(qmax)) / rngp).clamp_(max=INV_MAX)
    inv = torch.where(scale > 0, inv, torch.zeros_like(inv))
    return p, mnp, scale, inv, mn


def _int_quantize_groups(xg: torch.Tensor, qmax: int, dim):
    """Quantize float32 ``xg`` in groups reduced over ``dim``; returns (q, scale, zero).
    Per element: v = (x * p - mn * p) * inv + 0.5 (the kernels: one FMA for the first two
    roundings, equal here: p = 1 is exact, and with p = 0.5 mn * p is huge, see the spec),
    saturated to [0, qmax] with NaN -> 0 (+Inf -> qmax, -Inf -> 0), then floored."""
    p, mnp, scale, inv, zero = _int_group_params(xg, qmax, dim)
    v = (xg * p - mnp) * inv + 0.5  # separate mul and add: no FMA
    v = torch.where(v > 0, v, torch.zeros_like(v))  # NaN -> 0
    q = torch.floor(v.clamp_(max=float(qmax)))
    return q.to(torch.uint8), scale, zero


E4M3_NAN = 0x7F  # the one NaN code every backend writes (the GPU's cvt gives it for any NaN)


def e4m3_codes(y: torch.Tensor) -> torch.Tensor:
    """float32 already clamped to [-448, 448] (NaN allowed) -> e4m3 bytes, round to nearest even;
    every NaN, whatever its sign bit, becomes ``E4M3_NAN`` (torch's CPU cast keeps the sign, and
    CPU arithmetic can hand over a negative NaN where the GPU's gives a positive one)."""
    q = y.to(torch.float8_e4m3fn).view(torch.uint8)
    return torch.where(torch.isnan(y), torch.full_like(q, E4M3_NAN), q)


def _fp8_scope_amax(x: torch.Tensor, scope: str) -> torch.Tensor:
    """max |x| over the scope's finite values (0 if none): +-Inf and NaN do not set the scale."""
    a = x.abs()
    a = torch.where(a <= FLT_MAX, a, torch.zeros_like(a))
    if scope == "tensor":
        return a.amax(dim=(1, 2, 3))
    if scope == "head":
        return a.amax(dim=(1, 3))
    return a.amax(dim=3)


def _fp8_broadcast(scale: torch.Tensor, scope: str) -> torch.Tensor:
    """Scale of the scope's shape -> broadcastable against ``[L, T, H, D]``."""
    if scope == "tensor":
        return scale.view(-1, 1, 1, 1)
    if scope == "head":
        return scale.view(scale.shape[0], 1, scale.shape[1], 1)
    return scale.unsqueeze(-1)


def fp8_compute_scale(x: torch.Tensor, scope: str) -> torch.Tensor:
    """amax / 448 per scope (float32; amax over finite values), at least FLT_MIN (so that 1 / scale
    is finite); a zero amax gives 1."""
    a = _fp8_scope_amax(x.float(), scope)
    s = a / torch.full_like(a, FP8_MAX)  # IEEE division on every device (see _int_quantize_groups)
    return torch.where(s > 0, s.clamp(min=FLT_MIN), torch.ones_like(s))


def quantize_into(x, fmt: QuantFormat, codes, scale, zero, compute_scale: bool = True) -> None:
    L, T, H, D = x.shape
    xf = x.float()
    if fmt.kind == "fp8":
        if compute_scale:
            scale.copy_(fp8_compute_scale(xf, fmt.scope))
        inv = _fp8_broadcast(_recip(1.0, scale), fmt.scope)
        codes.copy_(e4m3_codes((xf * inv).clamp_(-FP8_MAX, FP8_MAX)))  # +-Inf saturates, NaN -> 0x7F
        return
    G = fmt.group_size
    if fmt.axis == "channel":
        q, sc, zp = _int_quantize_groups(xf.reshape(L, T, H, D // G, G), fmt.qmax, dim=-1)
        q = q.reshape(L, T, H, D)
        scale.copy_(sc.squeeze(-1))
        zero.copy_(zp.squeeze(-1))
    else:
        G = min(G, T)  # a group longer than T is the one group of all T (memory follows the input)
        ng = -(-T // G)
        pad = ng * G - T
        if pad:  # pad the last partial group with a copy of its first token (does not change min/max)
            fill = xf[:, (ng - 1) * G:(ng - 1) * G + 1].expand(L, pad, H, D)
            xf = torch.cat([xf, fill], dim=1)
        q, sc, zp = _int_quantize_groups(xf.reshape(L, ng, G, H, D), fmt.qmax, dim=2)
        q = q.reshape(L, ng * G, H, D)[:, :T]
        scale.copy_(sc.squeeze(2))
        zero.copy_(zp.squeeze(2))
    codes.copy_(_pack(q, fmt.bits))


def fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 fma(a, b, c) = a * b + c rounded once (IEEE), for float32 tensors whose products
    are exact in float64 (a: codes < 2^8): the float64 sum is made round-to-odd (TwoSum's error
    moves an even result one ulp toward it), which a float32 rounding then rounds correctly
    (53 >= 24 + 2 bits)."""
    p = a.double() * b.double()
    c = c.double()
    s = p + c
    bb = s - p
    e = (p - (s - bb)) + (c - bb)
    even = (s.view(torch.int64) & 1) == 0
    fix = (e != 0) & even & torch.isfinite(s)
    s = torch.where(fix, torch.nextafter(s, torch.where(e > 0, torch.full_like(s, float("inf")),
                                                        torch.full_like(s, float("-inf")))), s)
    return s.float()


def _decode(codes, scale, zero, fmt: QuantFormat, shape, dtype) -> torch.Tensor:
    """The values of ``codes`` as ``dtype`` [L, T, H, D]: code * scale (+ zero), computed in
    ``dtype`` (float32: the spec, one FMA for int codes; float64: the tests' ground truth)."""
    L, T, H, D = shape
    sc = scale.to(dtype)
    if fmt.kind == "fp8":
        return codes.view(torch.float8_e4m3fn).to(dtype) * _fp8_broadcast(sc, fmt.scope)
    q = _unpack(codes, fmt.bits).to(dtype)
    zp = zero.to(dtype)
    G = fmt.group_size if fmt.axis == "channel" else min(fmt.group_size, T)
    mad = fma32 if dtype == torch.float32 else (lambda a, b, c: a * b + c)
    if fmt.axis == "channel":
        y = mad(q.reshape(L, T, H, D // G, G), sc.unsqueeze(-1), zp.unsqueeze(-1))
    else:
        idx = torch.arange(T, device=codes.device) // G
        y = mad(q, sc[:, idx], zp[:, idx])
    return y.reshape(shape)


def dequantize_into(codes, scale, zero, fmt: QuantFormat, out) -> None:
    out.copy_(_decode(codes, scale, zero, fmt, out.shape, torch.float32))


def dequantize_float64(codes, scale, zero, fmt: QuantFormat, shape) -> torch.Tensor:
    """Dequantize in float64 (the tests' ground truth for the decoded values)."""
    return _decode(codes, scale, zero, fmt, shape, torch.float64)
