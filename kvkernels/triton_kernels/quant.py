"""Triton quantize / dequantize (docs/quant-spec.md; the torch reference is the spec).

Same functions and conventions as ``kvkernels/reference/quant.py``:

* ``quantize_into(x, fmt, codes, scale, zero, compute_scale)``: ``x`` ``[L, T, H, D]``
  bf16/fp16/fp32 with ``stride(-1) == 1`` (other strides arbitrary); ``codes`` contiguous uint8
  ``[L, T, H, D*bits/8]``; ``scale``/``zero`` contiguous float32 of ``fmt.scale_shape``.
* ``dequantize_into(codes, scale, zero, fmt, out)``: ``out`` ``[L, T, H, D]``, ``stride(-1) == 1``.
* ``supports(t, fmt)``: why this backend cannot run a case (None if it can).

Kernels. All are memory bound, but at full bandwidth the budget is only ~20 thread-instructions
per element, and the loads a thread has in flight must cover the memory latency, so the tiles
are shaped for few instructions per element, few shuffles/shared-memory layout changes and
enough bytes per thread:

* Tiles, not flat rows: a program owns a ``[TB tokens, HB heads]`` tile of one layer (grid =
  token blocks x head blocks x layers), so a row's (layer, token, head) come from the program
  ids and power-of-two constexpr shifts, never from run-time integer divisions. Offsets are
  ``l*s_l + t*s_t + h*s_h + d`` in int64 (any strides, > 2 GiB tensors). Rows past ``T``/``H``
  are clamped onto the last real one, so loads need no mask (only stores do): a duplicated row
  or token never changes a min/max.
* Layouts: Triton picks them (order of dims by contiguity; Triton 3.6 puts dims of equal
  contiguity in ascending order). The blocks below are laid out so that this gives the layout
  wanted; the code-byte offsets get a ``tl.max_contiguous`` cap (bytes per thread) so that codes
  are stored/loaded in the layout they are computed/used in (no shared-memory round trip).
* rows kernels (int ``channel`` quantize/dequantize, fp8 quantize/dequantize): the tile's rows
  (token, head, group) are flattened (group fastest) into ``[RB, NC, GC]`` (channel
  ``c*GC + jj``, GP = group or head_dim padded to a power of two = NC*GC). A thread holds
  ``row_elems`` elements of a row as whole 16-byte vectors (GC = lanes per row x vector):
  int quantize uses 32 (int4/int2 g32: a whole group per thread, so the min/max needs no
  shuffle and one thread does its divisions), fp8 quantize 16, dequantize 8 (whole rows per
  warp-load, coalesced stores). Sub-byte codes: the block is reshaped to ``[..., GC/K, K]`` (the split stays inside
  a thread) and packed as a sum of shifted codes; unpacking joins ``K`` codes on a new minor
  axis. Exception: int4/int2 ``channel`` dequantize keeps the previous version's kernel
  (``_dq_int_channel_flat``: flat rows, a group's codes per thread), measured faster there.
* int ``token`` quantize: a program owns one token group of ``HB`` heads (over the warps, and
  the spare lanes when head_dim is small) and ``DC`` channels, loaded once as ``[TL, HB, TA, DC]`` with ``2K`` channels (two code bytes) per
  thread: the TA tokens of a thread stay in its registers (min/max over them in-thread, plus
  log2(TL) shuffles when TL lanes share a channel). Full groups take a path without token
  clamps or masks, where the token strides of x and codes are constexprs when small
  (immediate load/store offsets); bf16/fp16 full groups read x as int32 words of two channels
  and take the min/max with packed ``min.NaN.bf16x2``-style instructions (_q_token_group_x2).
  Groups longer than one block take two passes (min/max, then quantize; the re-read hits
  L1/L2). int ``token`` dequantize (tl kernel: the interpreter, ``KVK_GLUON=0``, codes not
  aligned to their words): ``[TB, HB, DP]`` chunks of a group with the group's
  scale/zero loaded once (one joined load) and kept in registers. Both token kernels launch
  the full groups and a partial last group separately, so the fast path's register count is
  its own (a kernel is allocated the registers of its hungriest branch).
* fp8 ``tensor``/``head`` scopes with computed scales: an amax kernel (``atomic_max`` on the
  float bits as int32 into a zeroed buffer; |x| >= 0 so int order is float order) runs first,
  except where the Gluon one-pass kernel applies (below).
* Gluon kernels (``triton.experimental.gluon``: explicit layouts and shared memory; GPUs only,
  no interpreter; ``KVK_GLUON=0`` turns them off): int ``token`` dequantize
  (``_dq_int_token_gl``: a thread owns one 16-byte output vector, the group's scale / zero are
  loaded in that layout, no shared memory) and fp8 ``tensor``/``head`` quantize with computed
  scales in one pass over x (``_q_fp8_resident_gl``, sm_90+, cooperative launch: the CUDA
  one-pass design, layers or heads of up to 8 MiB held in shared memory while their programs
  exchange amax slots). CI compiles them for sm_90 (``tests/gluon_sm90.py``).

Quantize math is float32 as in docs/quant-spec.md: IEEE divisions (``div_rn``) once per group /
scale for ``scale`` and the clamped reciprocal ``inv``, then per element the explicit FMA
``x * p - mn * p`` (p = 1/2 only for ranges beyond FLT_MAX), a mul and an add; kernels are compiled
with ``enable_fp_fusion=False`` so that nothing else is contracted into an FMA; dequantize is one
explicit FMA (``tl.fma``, as the reference's ``fma32``). Codes are floored by a round-down add of
2^23 (``_int_codes``; a full-rate FADD.RM instead of a float-to-int conversion, which runs at 1/8
of the FP32 rate). Where ``scale == 0`` the kernels zero ``inv`` per group, which yields code 0.
The non-finite policy costs the common path nothing per element: int quantize programs take the
NaN-propagating min / max of their groups; if every group is plain (``_not_plain``: finite values,
a range that fits float32, one flag a program) they run the fast path (``_int_params_plain``: p
= 1, codes without saturation, exact there), else the general one: min / max of the finite
values only (``_minmax_fin``, the packed ``_bf16x2_minmax_fin``), ``_int_params`` and the
saturation to [0, qmax] (NaN -> 0) in ``_int_codes`` (channel: an exclusive branch; token: a
second, noinline pass after a block barrier that rewrites the program's outputs, so that the
fast path keeps its registers). fp8 amax is over finite values only (``_finite_abs``; the Gluon
one-pass kernel: one integer op an element orders Inf / NaN below every finite value). fp8: the GPU's
float-to-e4m3 conversion saturates (``satfinite``); the tl kernel clamps to +-448 explicitly
anyway (NaN kept), so that the interpreter
runs the same code (the Gluon one-pass kernel, GPU only, relies on the conversion). Dequantize
turns a code ``q`` into float32 exactly as ``bits(0x4B000000 | q) - 2^23`` (two full-rate
instructions instead of a slow int-to-float conversion). Codes: first channel in the low bits.
Tile sizes and warps are in ``CONFIG`` (tuned with ``experiments/triton_tune.py``).

Files: this one is the entry (``supports``, ``quantize_into``, ``dequantize_into``, ``CONFIG``, the
dispatch over kernels); ``quant_common.py`` the shared jit helpers (int math, row tiles) and launch
helpers; ``quant_int.py`` the int channel / token kernels; ``quant_fp8.py`` the fp8 kernels;
``quant_gluon.py`` the Gluon kernels and their launch plans.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton

from ..formats import QuantFormat
from .quant_common import (
    _DTYPES, _LAUNCH, _MAX_D, _MAX_GRID_Z, _SCOPE, _capability, _channel_dims, _geometry, _p2,
    _pow2_floor, _row_tile, _rows_launch,
)
from .quant_int import (
    _channel_launch, _dq_int_channel, _dq_int_channel_flat, _dq_int_token, _pairs_ok, _q_int_channel,
    _q_int_token, _q_token_launch, _token_parts, _token_strides,
)
from .quant_fp8 import _dq_fp8, _fp8_amax, _q_fp8
from .quant_gluon import (
    _dq_int_token_gl, _dq_token_gluon_launch, _dq_token_gluon_ok, _dq_token_gluon_params,
    _fp8_resident_plan, _q_fp8_resident_gl, _q_fp8_resident_launch, gluon,
)


# Launch configuration: ``elems`` = elements per program (a power of two; the tile is sized to
# it), ``warps`` = num_warps (capped so that warps split rows only). Chosen with
# experiments/triton_tune.py on an H200 (bf16 [32, T, 8, 128], T = 4096 and 32768, Triton 3.6).
CONFIG = {
    # rows kernels: elements per program, warps, elements per thread of a row (the lanes
    # sharing a row = row length / row_elems; row_elems = 8 bf16: whole rows per warp-load)
    "q_channel": dict(elems=2048, warps=2, row_elems=32),
    "dq_channel": dict(elems=16384, warps=16, row_elems=8),   # int8 codes (sub-byte: _flat)
    "q_fp8": dict(elems=8192, warps=8, row_elems=16),
    "dq_fp8": dict(elems=16384, warps=4, row_elems=8),
    "amax_fp8": dict(elems=8192, warps=8),
    # token groups: x elements per thread, warps (= heads per program)
    "q_token": dict(thread_elems=128, warps=2, pairs=1),
    "dq_token": dict(elems=16384, warps=4),
}


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------
def supports(t: torch.Tensor, fmt: QuantFormat) -> Optional[str]:
    """None if these kernels can run ``fmt`` on tensors like ``t`` (x or out), else why not."""
    dev = t.device.type
    if dev == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"
    elif dev != "cuda":
        return f"tensors on {dev} are not supported (CUDA only)"
    if t.dtype not in _DTYPES:
        return f"dtype {t.dtype} is not supported"
    D = int(t.shape[-1])
    if D > _MAX_D:
        return f"head_dim {D} > {_MAX_D} is not supported"
    if fmt.kind == "fp8":
        if dev == "cuda":
            cap = _capability(t.device.index)
            if cap < (8, 9):
                return f"fp8 e4m3 (tl.float8e4nv) needs compute capability >= 8.9, got {cap[0]}.{cap[1]}"
        return None
    k = fmt.per_byte
    if fmt.axis == "channel":
        if fmt.group_size % k:
            return f"group_size {fmt.group_size} is not a multiple of {k} codes per byte for {fmt}"
        if _p2(fmt.group_size) * _p2(D // max(fmt.group_size, 1)) > 4 * _MAX_D:
            return f"head_dim {D} with group_size {fmt.group_size} is too large a block"
    return None


def _group_size(fmt: QuantFormat, T: int) -> int:
    """The group size the kernels run: a token group longer than the T tokens is the one group
    of all T (same scales, same codes), so that tiles, unrolled chunk loops and grids follow the
    input, not the format's group size (int4:g1000000:token on 5 tokens)."""
    G = fmt.group_size
    return min(G, max(int(T), 1)) if fmt.kind == "int" and fmt.axis == "token" else G


def _merge_heads(t: torch.Tensor, fmt: QuantFormat, quantize: bool) -> bool:
    """Whether to run a rows kernel on ``[L, T*H, 1, D]`` views: when H is not a power of two
    (a ``[tokens, heads]`` tile padded to 2^k heads spends its padding lanes on clamped duplicate
    rows, e.g. a quarter of them for SmolLM2's 3 KV heads) and the token and head dims of x /
    out merge. Only formats whose scales are per row or per layer (not per head, not token
    groups), and only kernels that tile rows (int4/int2 channel dequantize is already flat)."""
    H = int(t.shape[2])
    if H & (H - 1) == 0 or t.stride(1) != H * t.stride(2):
        return False
    if fmt.kind == "fp8":
        return fmt.scope != "head"
    return fmt.axis == "channel" and (quantize or fmt.bits == 8)


def _rows_view(t, L: int, rows: int):
    """[L, T, H, ...] -> [L, T*H, 1, ...] (a view; None and per-layer [L] scales stay)."""
    if t is None or t.dim() < 3:
        return t
    return t.view(L, rows, 1, *t.shape[3:])


def _layer_chunks(L: int, *tensors):
    """The tensors (None stays None) cut into layer ranges of at most 65535 (the grid's last
    dim is the layer), one tuple per range."""
    for l0 in range(0, L, _MAX_GRID_Z):
        sl = slice(l0, min(L, l0 + _MAX_GRID_Z))
        yield tuple(None if t is None else t[sl] for t in tensors)


def quantize_into(x, fmt: QuantFormat, codes, scale, zero, compute_scale: bool = True) -> None:
    L, T, H, D, s_l, s_t, s_h, es, DP = _geometry(x)
    if L * T * H == 0:
        return
    if L > _MAX_GRID_Z:
        for xc, cc, sc, zc in _layer_chunks(L, x, codes, scale, zero):
            quantize_into(xc, fmt, cc, sc, zc, compute_scale)
        return
    if _merge_heads(x, fmt, quantize=True):
        xm, cm, sm, zm = (_rows_view(t, L, T * H) for t in (x, codes, scale, zero))
        quantize_into(xm, fmt, cm, sm, zm, compute_scale)
        return
    if fmt.kind == "fp8":
        scope = _SCOPE[fmt.scope]
        amax = scale  # placeholder pointer when unused
        if compute_scale and scope != 2:
            plan = _fp8_resident_plan(x, codes, fmt)
            if plan is not None:
                _q_fp8_resident_launch(x, codes, scale, plan)
                return
            cfg = CONFIG["amax_fp8"]
            amax = torch.zeros(scale.shape, dtype=torch.int32, device=x.device)
            TB, HB = _row_tile(T, H, DP, cfg["elems"])
            _fp8_amax[(triton.cdiv(T, TB), triton.cdiv(H, HB), L)](
                x, amax, T, H, s_l, s_t, s_h, D=D, DP=DP, TB=TB, HB=HB, SCOPE=scope,
                num_warps=cfg["warps"], **_LAUNCH)
        grid, TB, HB, GC, nw = _rows_launch(T, H, L, 1, DP, es, CONFIG["q_fp8"])
        _q_fp8[grid](
            x, codes, scale, amax, T, H, s_l, s_t, s_h, D=D, DP=DP, TB=TB, HB=HB, GC=GC,
            CV=min(GC, 16 // es), SCOPE=scope, COMPUTE=bool(compute_scale),
            num_warps=nw, **_LAUNCH)
        return
    G, K = _group_size(fmt, T), fmt.per_byte
    if fmt.axis == "channel":
        grid, kw = _channel_launch(T, H, L, D, G, fmt.bits, es, CONFIG["q_channel"])
        _q_int_channel[grid](x, codes, scale, zero, T, H, s_l, s_t, s_h, **kw)
    else:
        grid, DC, TA, TL, HB, VX, nw = _q_token_launch(T, H, D, L, G, K, es, CONFIG["q_token"])
        XS, CS = _token_strides(s_t, es, G, H, D, K)
        cfg = CONFIG["q_token"]
        pairs = bool(cfg.get("pairs", 0)) and _pairs_ok(x, K, D, DC, TA * TL >= G)
        for tg0, n, part in _token_parts(T, G):
            _q_int_token[(n,) + grid[1:]](
                x, codes, scale, zero, T, H, s_l, s_t, s_h, tg0, D=D, DC=DC, G=G, TA=TA, TL=TL,
                HB=HB, BITS=fmt.bits, VX=VX, XS=XS, CS=CS, PAIRS=pairs and not part, PART=part, num_warps=nw, **_LAUNCH)


def dequantize_into(codes, scale, zero, fmt: QuantFormat, out) -> None:
    L, T, H, D, s_l, s_t, s_h, es, DP = _geometry(out)
    if L * T * H == 0:
        return
    if L > _MAX_GRID_Z:
        for cc, sc, zc, oc in _layer_chunks(L, codes, scale, zero, out):
            dequantize_into(cc, sc, zc, fmt, oc)
        return
    if _merge_heads(out, fmt, quantize=False):
        cm, sm, zm, om = (_rows_view(t, L, T * H) for t in (codes, scale, zero, out))
        dequantize_into(cm, sm, zm, fmt, om)
        return
    if fmt.kind == "fp8":
        grid, TB, HB, GC, nw = _rows_launch(T, H, L, 1, DP, es, CONFIG["dq_fp8"])
        _dq_fp8[grid](
            codes, scale, out, T, H, s_l, s_t, s_h, D=D, DP=DP, TB=TB, HB=HB, GC=GC,
            SCOPE=_SCOPE[fmt.scope], CV=min(GC, 16 // es), num_warps=nw, **_LAUNCH)
        return
    G, K = _group_size(fmt, T), fmt.per_byte
    if fmt.axis == "channel" and fmt.bits < 8:
        NG, GP, NGP = _channel_dims(D, G)
        width = GP * NGP   # rows of ~16 KiB of output per program, as in the previous version
        ROWS = max(1, min(1024, (16384 // es) // width)) if width <= 16384 // es else 1
        R = L * T * H
        _dq_int_channel_flat[(triton.cdiv(R, ROWS),)](
            codes, scale, zero, out, R, T, H, s_l, s_t, s_h, G=G, NG=NG, GP=GP, NGP=NGP,
            BITS=fmt.bits, ROWS=ROWS, num_warps=8 if ROWS * width >= 4096 else 4, **_LAUNCH)
    elif fmt.axis == "channel":
        grid, kw = _channel_launch(T, H, L, D, G, fmt.bits, es, CONFIG["dq_channel"])
        _dq_int_channel[grid](codes, scale, zero, out, T, H, s_l, s_t, s_h, **kw)
    elif _dq_token_gluon_ok(codes, out, fmt):
        _dq_token_gluon_launch(codes, scale, zero, fmt, out)
    else:
        cfg = CONFIG["dq_token"]
        TB = min(_p2(G), _pow2_floor(max(1, cfg["elems"] // DP)))
        HB = min(_p2(H), _pow2_floor(max(1, cfg["elems"] // (TB * DP))))
        OS, CS = _token_strides(s_t, es, G, H, D, K)
        for tg0, n, part in _token_parts(T, G):
            _dq_int_token[(n, triton.cdiv(H, HB), L)](
                codes, scale, zero, out, T, H, s_l, s_t, s_h, tg0, D=D, DP=DP, G=G, TB=TB,
                HB=HB, BITS=fmt.bits, CV=max(1, (16 // es) // K), OS=OS, CS=CS, PART=part,
                num_warps=cfg["warps"], **_LAUNCH)
