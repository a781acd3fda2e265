"""Paged scatter / gather between flat (or quantized) KV and serving-engine caches.

``scatter(kv, layout, slot_mapping)`` writes flat KV ``[num_kv, L, T, H, D]`` (or a
:class:`QuantizedKV`, dequantized on the fly) into the paged caches of ALL layers in one launch;
``gather(layout, slot_mapping)`` reads them back (optionally quantizing on the fly). Layouts are
:class:`~kvkernels.layouts.PagedLayout` values (docs/paged.md); the spec is
``kvkernels/reference/paged.py``.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple, Union

import torch

from . import dispatch
from .formats import INPUT_DTYPES, QuantFormat, QuantizedKV
from .layouts import DTYPE_CODE, PagedLayout, PageTable, page_table_slots

for _b, _mod in (("cuda", "kvkernels.cuda.paged"), ("triton", "kvkernels.triton_kernels.paged"),
                 ("torch", "kvkernels.reference.paged")):
    dispatch.register("scatter", _b, _mod, "scatter_into", None if _b == "torch" else "supports_scatter")
    dispatch.register("gather", _b, _mod, "gather_into", None if _b == "torch" else "supports_gather")
for _op in ("scatter", "gather"):  # H100, bench paged (bench/results/paged-*-h100-*): Triton >= CUDA on every row
    dispatch.prefer(_op, ("triton", "cuda", "torch"),
                    "Triton measured ahead of CUDA on every bench row (plain, fp8 caches, fused (de)quantize)")

HOST_PATHS = ("auto", "copy", "kernel")
SLOT_DTYPES = (torch.int32, torch.int64)


@functools.lru_cache(maxsize=256)
def _fmt(spec: str) -> Optional[QuantFormat]:
    return QuantFormat.parse(spec) if spec else None


def fused_gather_format(fmt: QuantFormat) -> bool:
    """Formats gathered and quantized in one pass (the rest: gather, then ``quantize``): groups
    inside one token-head row (int ``channel``, fp8 ``token_head``)."""
    return (fmt.kind == "int" and fmt.axis == "channel") or (fmt.kind == "fp8" and fmt.scope == "token_head")


def _rebuild(spec: List[int], caches: List[torch.Tensor], ptrs: torch.Tensor, engine: str = "op") -> PagedLayout:
    """The PagedLayout an op was called with, from its primitive arguments (no checks)."""
    L, nkv, NB, BS, H, D, x, dcode = spec[:8]
    st = (tuple(spec[8:13]), tuple(spec[13:18]))[:nkv]
    return PagedLayout(engine=engine, num_layers=L, num_kv=nkv, num_blocks=NB, block_size=BS, num_heads=H,
                       head_dim=D, dtype=caches[0].dtype, fp8=dcode == 3, strides=st, x=x, device=caches[0].device,
                       bases=tuple(caches), ptrs=ptrs)


def _case_key(layout: PagedLayout, t: torch.Tensor, fmt, extra=()):
    return (tuple(layout.spec()), layout.dtype, layout.device, t.dtype, t.device, t.is_pinned() if
            t.device.type == "cpu" else False, fmt, *extra)


def _device_type(layout: PagedLayout) -> str:
    return layout.device.type


# ---- torch.library ops (mutate caller-owned caches / outputs; fake kernels do nothing) -------
@torch.library.custom_op("kvkernels::scatter", mutates_args=("caches", "oob_count"))
def scatter_op(kv: torch.Tensor, scale: Optional[torch.Tensor], zero: Optional[torch.Tensor], fmt: str,
               caches: List[torch.Tensor], ptrs: torch.Tensor, spec: List[int], slots: torch.Tensor,
               k_scale: Optional[torch.Tensor], v_scale: Optional[torch.Tensor], oob_count: Optional[torch.Tensor],
               max_sms: int, backend: Optional[str]) -> None:
    """kv [num_kv, L, T_in, H, D] (or codes [num_kv*L, T_in, H, Dp] + scale/zero of ``fmt``) ->
    the caches described by ``spec`` / ``ptrs`` (``caches``: the tensors written through)."""
    lay = _rebuild(spec, caches, ptrs)
    f = _fmt(fmt)
    _, impl = dispatch.resolve("scatter", _case_key(lay, kv, f, (max_sms > 0,)), (lay, kv, f, max_sms), backend,
                               _device_type(lay))
    cs = (k_scale, v_scale) if lay.fp8 else None
    impl(lay, kv, scale, zero, f, slots, cs, oob_count, max_sms=max_sms)


@scatter_op.register_fake
def _(kv, scale, zero, fmt, caches, ptrs, spec, slots, k_scale, v_scale, oob_count, max_sms, backend) -> None:
    return None


@torch.library.custom_op("kvkernels::gather", mutates_args=("out", "codes", "scale", "zero", "oob_count"))
def gather_op(caches: List[torch.Tensor], ptrs: torch.Tensor, spec: List[int], slots: torch.Tensor,
              out: Optional[torch.Tensor], codes: Optional[torch.Tensor], scale: Optional[torch.Tensor],
              zero: Optional[torch.Tensor], fmt: str, k_scale: Optional[torch.Tensor], v_scale: Optional[torch.Tensor],
              oob_count: Optional[torch.Tensor], max_sms: int, backend: Optional[str]) -> None:
    """The caches -> ``out`` [num_kv, L, T, H, D] (``fmt`` empty) or codes/scale/zero of ``fmt``."""
    lay = _rebuild(spec, caches, ptrs)
    f = _fmt(fmt)
    t = out if out is not None else scale
    _, impl = dispatch.resolve("gather", _case_key(lay, t, f, (max_sms > 0,)), (lay, t, f, max_sms), backend,
                               _device_type(lay))
    cs = (k_scale, v_scale) if lay.fp8 else None
    impl(lay, slots, out, codes, scale, zero, f, cs, oob_count, max_sms=max_sms)


@gather_op.register_fake
def _(caches, ptrs, spec, slots, out, codes, scale, zero, fmt, k_scale, v_scale, oob_count, max_sms, backend) -> None:
    return None


# ---- validation (host side, metadata only unless validate) ----------------------------------
def _tensor(name: str, t, *, dtypes=None, device=None, dim=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the caches' device), got {t.device}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-D tensor, got shape {tuple(t.shape)}")
    return t


def _check_layout(layout) -> PagedLayout:
    if not isinstance(layout, PagedLayout):
        raise TypeError(f"layout: expected a kvkernels.PagedLayout, got {type(layout).__name__}")
    if layout.ptrs is None or len(layout.bases) != layout.num_kv * layout.num_layers:
        raise ValueError("layout: has no caches bound (build it with a PagedLayout constructor)")
    for i, b in enumerate(layout.bases):  # the caches must not have been reallocated / moved
        if b.device != layout.device:
            raise ValueError(f"layout: cache {i} is on {b.device}, the layout on {layout.device}")
    return layout


def _flat_device_ok(name: str, t: torch.Tensor, layout: PagedLayout) -> bool:
    """True if ``t`` lives in pinned host memory for a CUDA layout; raises if on another device."""
    if t.device == layout.device:
        return False
    if t.device.type == "cpu" and layout.device.type == "cuda":
        if not t.is_pinned():
            raise ValueError(f"{name}: a host-side flat tensor must be in pinned memory (tensor.pin_memory()) "
                             f"for caches on {layout.device}")
        return True
    raise ValueError(f"{name}: expected a tensor on {layout.device} (the caches' device) or pinned host memory, "
                     f"got {t.device}")


def _check_flat(name: str, t, layout: PagedLayout, T_min: int, exact_T: Optional[int] = None) -> bool:
    _tensor(name, t, dtypes=INPUT_DTYPES, dim=5)
    nkv, L, H, D = layout.num_kv, layout.num_layers, layout.num_heads, layout.head_dim
    want = (nkv, L, exact_T if exact_T is not None else t.shape[2], H, D)
    if tuple(t.shape) != want:
        raise ValueError(f"{name}: expected shape [num_kv, L, T, H, D] = {want} for {layout}, got {tuple(t.shape)}")
    if t.shape[2] < T_min:
        raise ValueError(f"{name}: has {t.shape[2]} tokens, fewer than slot_mapping's {T_min}")
    if t.stride(-1) != 1 and D > 1:
        raise ValueError(f"{name}: the last dim (head_dim) must be dense (stride 1), got strides {t.stride()}")
    return _flat_device_ok(name, t, layout)


def _check_quantized(q: QuantizedKV, layout: PagedLayout, T_min: int) -> bool:
    fmt = q.format
    c = _tensor("kv.codes", q.codes, dtypes=(fmt.codes_dtype(),), dim=4)
    R, T_in, H, Dp = c.shape
    want = layout.num_kv * layout.num_layers
    if R != want or H != layout.num_heads or q.head_dim != layout.head_dim:
        raise ValueError(f"kv: expected a QuantizedKV of [num_kv * L, T, H, D] = [{want}, T, {layout.num_heads}, "
                         f"{layout.head_dim}] (quantize(kv.flatten(0, 1), fmt)), got {q.shape}")
    if Dp * 8 != q.head_dim * fmt.bits:
        raise ValueError(f"kv.codes: last dim {Dp} does not match head_dim {q.head_dim} at {fmt.bits} bits")
    if T_in < T_min:
        raise ValueError(f"kv: has {T_in} tokens, fewer than slot_mapping's {T_min}")
    fmt.check_shape(T_in, H, q.head_dim)
    if not c.is_contiguous():
        raise ValueError("kv.codes: expected a contiguous tensor")
    host = _flat_device_ok("kv.codes", c, layout)
    sshape = fmt.scale_shape(R, T_in, H, q.head_dim)
    for name, t in (("kv.scale", q.scale), ("kv.zero", q.zero if fmt.has_zero else None)):
        if t is None:
            if name == "kv.zero" and fmt.has_zero:
                raise TypeError("kv.zero: expected a torch.Tensor for an int format, got None")
            continue
        _tensor(name, t, dtypes=(torch.float32,), device=c.device)
        if tuple(t.shape) != tuple(sshape) or not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor of shape {tuple(sshape)}, got {tuple(t.shape)}")
    return host


def _check_slots(slot_mapping, page_table, layout: PagedLayout, num_tokens: Optional[int], validate: bool):
    """-> int32/int64 slots [T] on the caches' device."""
    if (slot_mapping is None) == (page_table is None):
        raise ValueError("slot_mapping: pass exactly one of slot_mapping and page_table")
    if slot_mapping is not None:
        s = _tensor("slot_mapping", slot_mapping, dtypes=SLOT_DTYPES, device=layout.device, dim=1)
        if validate:
            sv = s.cpu().to(torch.int64)
            bad = torch.nonzero(sv >= layout.num_slots).flatten()
            if bad.numel():
                i = int(bad[0])
                raise ValueError(f"slot_mapping: slot {int(sv[i])} at index {i} is out of range: the caches have "
                                 f"{layout.num_slots} slots ({layout.num_blocks} blocks x {layout.block_size}); "
                                 f"negative slots skip a token")
        return s
    if not isinstance(page_table, PageTable):
        raise TypeError(f"page_table: expected a kvkernels.PageTable, got {type(page_table).__name__}")
    for name in ("kv_indptr", "kv_indices", "kv_last_page_len"):
        _tensor(f"page_table.{name}", getattr(page_table, name), dtypes=(torch.int32,), device=layout.device, dim=1)
    B = page_table.kv_last_page_len.shape[0]
    if page_table.kv_indptr.shape[0] != B + 1:
        raise ValueError(f"page_table.kv_indptr: expected {B + 1} entries (batch {B} + 1), got "
                         f"{page_table.kv_indptr.shape[0]}")
    if validate:
        ip, ix, ll = (getattr(page_table, n).cpu().to(torch.int64) for n in ("kv_indptr", "kv_indices", "kv_last_page_len"))
        if ip[0] != 0 or (ip[1:] < ip[:-1]).any() or ip[-1] > ix.numel():
            raise ValueError(f"page_table.kv_indptr: expected non-decreasing offsets from 0 to at most "
                             f"{ix.numel()}, got {ip.tolist()}")
        used = ix[:int(ip[-1])]
        if used.numel() and (used.min() < 0 or used.max() >= layout.num_blocks):
            raise ValueError(f"page_table.kv_indices: page ids must be in [0, {layout.num_blocks}), got "
                             f"[{int(used.min())}, {int(used.max())}]")
        has = (ip[1:] - ip[:-1]) > 0
        if ((ll < 1) | (ll > layout.block_size))[has].any():
            raise ValueError(f"page_table.kv_last_page_len: expected 1..{layout.block_size} tokens per last page")
    return page_table_slots(page_table, layout.block_size, num_tokens)


def _check_scales(layout: PagedLayout, k_scale, v_scale):
    """-> (k [L, H], v [L, H] or None) float32 views (0 strides for broadcast dims), or (None, None)."""
    if not layout.fp8:
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            if s is not None:
                raise ValueError(f"{name}: only fp8 caches take scales; the caches are {layout.dtype}")
        return None, None
    L, H = layout.num_layers, layout.num_heads
    out = []
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if name == "v_scale" and layout.num_kv == 1:
            if s is not None:
                raise ValueError("v_scale: a latent (MLA) cache has one scale, k_scale")
            out.append(None)
            continue
        if s is None:
            raise ValueError(f"{name}: fp8 caches need a float32 scale tensor (shape (), [1], [H], [L, 1] or [L, H])")
        _tensor(name, s, dtypes=(torch.float32,), device=layout.device)
        shp = tuple(s.shape)
        if shp in ((), (1,)):
            s = s.reshape(1, 1)
        elif shp == (H,):
            s = s.reshape(1, H)
        elif shp not in ((L, 1), (L, H)):
            raise ValueError(f"{name}: expected shape (), [1], [H]={H}, [L, 1] or [L, H]=[{L}, {H}], got {shp}")
        out.append(s.expand(L, H))
    return out[0], out[1]


def _check_counter(oob_count, layout):
    if oob_count is None:
        return None
    _tensor("oob_count", oob_count, dtypes=(torch.int32, torch.int64), device=layout.device)
    if oob_count.numel() != 1:
        raise ValueError(f"oob_count: expected a 1-element counter, got shape {tuple(oob_count.shape)}")
    return oob_count.view(1)


def _host_path(host_path: str, max_sms: int) -> None:
    if host_path not in HOST_PATHS:
        raise ValueError(f"host_path: expected one of {HOST_PATHS}, got {host_path!r}")
    if not isinstance(max_sms, int) or max_sms < 0:
        raise ValueError(f"max_sms: expected an int >= 0 (0: no bound), got {max_sms!r}")


# ---- public API ------------------------------------------------------------------------------
def scatter(kv: Union[torch.Tensor, QuantizedKV], layout: PagedLayout, slot_mapping: Optional[torch.Tensor] = None,
            *, page_table: Optional[PageTable] = None, k_scale: Optional[torch.Tensor] = None,
            v_scale: Optional[torch.Tensor] = None, oob_count: Optional[torch.Tensor] = None,
            validate: Optional[bool] = None, host_path: str = "auto", max_sms: int = 0,
            backend: Optional[str] = None) -> None:
    """Write flat KV of all layers into an engine's paged caches (one launch for all layers).

    Args:
        kv: flat ``[num_kv, L, T_in, H, D]`` (K then V; ``num_kv = 1`` for MLA) bf16/fp16/fp32,
            head_dim dense, other strides arbitrary; or a :class:`QuantizedKV` of
            ``[num_kv * L, T_in, H, D]`` (``quantize(kv.flatten(0, 1), fmt)``), dequantized on the
            fly. On the caches' device, or in pinned host memory (see ``host_path``).
        layout: the caches (:class:`PagedLayout`), written.
        slot_mapping: int32/int64 ``[T]`` on the caches' device (vLLM): token ``t`` (< T <= T_in)
            goes to slot ``block * block_size + offset``; ``< 0`` skips the token.
        page_table: instead of ``slot_mapping``: FlashInfer's :class:`PageTable` (int32), tokens
            of the batch's sequences back to back, ``T = T_in``.
        k_scale, v_scale: fp8 caches only (required there): float32 device tensors of shape
            ``()``/``[1]`` (per tensor), ``[H]`` (per head), ``[L, 1]`` or ``[L, H]``; codes are
            ``e4m3(clamp(x * (1 / scale), +-448))``.
        oob_count: optional int32/int64 ``[1]`` device counter: slots ``>= num_blocks *
            block_size`` (and page ids outside the table) are skipped and added to it.
        validate: check slot / page values on the host (a device sync). Default: on for CPU
            tensors, off for CUDA ones (the kernels then skip out-of-range entries, never writing
            outside the caches).
        host_path: for pinned host ``kv``: ``"copy"`` (one async copy-engine transfer to a device
            staging buffer, then the kernel), ``"kernel"`` (the CUDA kernel reads pinned memory
            directly, ``max_sms`` bounding its blocks), ``"auto"`` (``"copy"``).
        max_sms: bound on the thread blocks (one per SM) of the kernel; 0: no bound.
        backend: ``"cuda"``, ``"triton"`` or ``"torch"`` (default: ``KVKERNELS_BACKEND`` or the
            first that supports the case).

    Raises ``ValueError`` / ``TypeError`` naming the argument before anything is written.
    """
    layout = _check_layout(layout)
    _host_path(host_path, max_sms)
    T_min = slot_mapping.shape[0] if isinstance(slot_mapping, torch.Tensor) and slot_mapping.dim() == 1 else 0
    if isinstance(kv, QuantizedKV):
        host = _check_quantized(kv, layout, T_min)
        fmt, T_in = str(kv.format), kv.codes.shape[1]
    elif isinstance(kv, torch.Tensor):
        host = _check_flat("kv", kv, layout, T_min)
        fmt, T_in = "", kv.shape[2]
    else:
        raise TypeError(f"kv: expected a torch.Tensor or a QuantizedKV, got {type(kv).__name__}")
    if validate is None:
        validate = layout.device.type == "cpu"
    slots = _check_slots(slot_mapping, page_table, layout, T_in, validate)
    ks, vs = _check_scales(layout, k_scale, v_scale)
    cnt = _check_counter(oob_count, layout)
    if isinstance(kv, QuantizedKV):
        codes, scale, zero = kv.codes, kv.scale, kv.zero
    else:
        codes, scale, zero = kv, None, None
    if host and host_path != "kernel":  # copy engine: one async transfer, then the device kernel
        codes = codes.to(layout.device, non_blocking=True)
        scale = scale.to(layout.device, non_blocking=True) if scale is not None else None
        zero = zero.to(layout.device, non_blocking=True) if zero is not None else None
        host = False
    elif scale is not None and host:  # scales are small: always on the device
        scale = scale.to(layout.device, non_blocking=True)
        zero = zero.to(layout.device, non_blocking=True) if zero is not None else None
    if host and backend not in (None, "cuda"):
        raise ValueError(f"host_path: 'kernel' reads pinned memory with the CUDA kernel; backend={backend!r} cannot")
    scatter_op(codes, scale, zero, fmt, layout.owners(), layout.ptrs,
               layout.spec(), slots, ks, vs, cnt, int(max_sms), "cuda" if host else backend)


def gather(layout: PagedLayout, slot_mapping: Optional[torch.Tensor] = None, *, page_table: Optional[PageTable] = None,
           num_tokens: Optional[int] = None, out: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None,
           format: Union[str, QuantFormat, None] = None, k_scale: Optional[torch.Tensor] = None,
           v_scale: Optional[torch.Tensor] = None, oob_count: Optional[torch.Tensor] = None,
           validate: Optional[bool] = None, host_path: str = "auto", max_sms: int = 0,
           backend: Optional[str] = None) -> Union[torch.Tensor, QuantizedKV]:
    """Read the tokens of ``slot_mapping`` (or a page table) from the caches of all layers.

    Args:
        layout, slot_mapping, page_table, k_scale, v_scale, oob_count, validate, max_sms,
            backend: as in :func:`scatter` (fp8 caches are decoded as ``e4m3 * scale``).
        num_tokens: T for a page table (default: ``out.shape[2]``; required without ``out``).
        out: optional flat ``[num_kv, L, T, H, D]`` bf16/fp16/fp32 (head_dim dense), on the
            caches' device or pinned host memory; skipped tokens leave it unchanged. Default: a
            zero-filled tensor of ``dtype`` (default the cache dtype; bf16 for fp8 caches).
        format: quantize on the fly into this format (a :class:`QuantFormat` or its string);
            returns a :class:`QuantizedKV` of ``[num_kv * L, T, H, D]`` (skipped tokens quantized
            as zeros). int ``channel`` and fp8 ``token_head`` are fused into the gather; other
            formats gather first (exactly), then quantize.
        host_path: for a pinned host ``out``: ``"copy"``/``"auto"`` (gather on the device, one
            async copy back; skipped tokens are then written as zeros), ``"kernel"`` (the CUDA
            kernel writes pinned memory directly).

    Returns: ``out`` (flat) or a :class:`QuantizedKV`.
    """
    layout = _check_layout(layout)
    _host_path(host_path, max_sms)
    if validate is None:
        validate = layout.device.type == "cpu"
    if format is not None:
        fmt = QuantFormat.parse(format)
        if out is not None:
            raise ValueError("out: gather with a format returns a QuantizedKV; out must be None")
    else:
        fmt = None
    host = False
    if out is not None:
        T = slot_mapping.shape[0] if isinstance(slot_mapping, torch.Tensor) and slot_mapping.dim() == 1 else num_tokens
        host = _check_flat("out", out, layout, 0, exact_T=T)
        if dtype is not None and out.dtype != dtype:
            raise TypeError(f"out: dtype {out.dtype} does not match dtype={dtype}")
        T = out.shape[2]
    elif slot_mapping is not None:
        T = slot_mapping.shape[0] if isinstance(slot_mapping, torch.Tensor) else 0
    else:
        if not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_tokens: a page table without out needs num_tokens (an int >= 1), got {num_tokens!r}")
        T = num_tokens
    if dtype is None:
        dtype = out.dtype if out is not None else (torch.bfloat16 if layout.fp8 else layout.dtype)
    if dtype not in INPUT_DTYPES:
        raise TypeError(f"dtype: expected one of {[str(d) for d in INPUT_DTYPES]}, got {dtype}")
    slots = _check_slots(slot_mapping, page_table, layout, T, validate)
    ks, vs = _check_scales(layout, k_scale, v_scale)
    cnt = _check_counter(oob_count, layout)
    NKV, L, H, D = layout.num_kv, layout.num_layers, layout.num_heads, layout.head_dim
    dev = layout.device
    if fmt is not None:
        fmt.check_shape(T, H, D)
        R = NKV * L
        if fused_gather_format(fmt):
            codes = torch.empty(fmt.codes_shape(R, T, H, D), dtype=torch.uint8, device=dev)
            scale = torch.empty(fmt.scale_shape(R, T, H, D), dtype=torch.float32, device=dev)
            zero = torch.empty_like(scale) if fmt.has_zero else None
            gather_op(layout.owners(), layout.ptrs, layout.spec(), slots, None, codes, scale, zero, str(fmt), ks, vs,
                      cnt, int(max_sms), backend)
            return QuantizedKV(codes=codes.view(fmt.codes_dtype()), scale=scale, zero=zero, format=fmt, dtype=dtype,
                               head_dim=D)
        # gather exactly (the cache dtype, float32 for decoded fp8), then quantize
        tmp = torch.zeros(NKV, L, T, H, D, dtype=torch.float32 if layout.fp8 else layout.dtype, device=dev)
        gather_op(layout.owners(), layout.ptrs, layout.spec(), slots, tmp, None, None, None, "", ks, vs, cnt,
                  int(max_sms), backend)
        from .quant import quantize

        q = quantize(tmp.view(NKV * L, T, H, D), fmt, backend=backend)
        q.dtype = dtype
        return q
    if out is None:
        out = torch.zeros(NKV, L, T, H, D, dtype=dtype, device=dev)
    target = out
    if host and host_path != "kernel":
        # one device-to-host copy of the whole result: skipped tokens are written as zeros here
        target = torch.zeros(out.shape, dtype=out.dtype, device=dev)
    elif host and backend not in (None, "cuda"):
        raise ValueError(f"host_path: 'kernel' writes pinned memory with the CUDA kernel; backend={backend!r} cannot")
    gather_op(layout.owners(), layout.ptrs, layout.spec(), slots, target, None, None, None, "", ks, vs, cnt,
              int(max_sms), "cuda" if (host and host_path == "kernel") else backend)
    if target is not out:
        out.copy_(target, non_blocking=True)
    return out
