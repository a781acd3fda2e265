"""CUDA backend of the fused rANS decode into paged caches (csrc/codec_dequant.cu).

Same function and arguments as ``kvkernels.reference.codec.rans_decode_pages_into`` (the spec);
the public wrapper ``kvkernels.codec.paged.rans_decode_pages`` checks every tensor. One launch
for every segment of every layer, on torch's current stream, no host sync (CUDA-graph
capturable: the layout's pointer array is built once with the layout).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..layouts import PagedLayout
from . import codec as _codec


def supports(layout: PagedLayout, *args) -> Optional[str]:
    if layout.device.type != "cuda":
        return f"the CUDA decoder needs caches on a CUDA device (got {layout.device})"
    if not hasattr(_codec._ext(), "codec_rans_decode_pages"):
        return "kvkernels._C was built without the decode-into-pages kernel (rebuild it)"
    return None


def _scales(layout: PagedLayout, cache_scale):
    if not layout.fp8:
        return [0] * 6
    ks, vs = cache_scale
    vs = ks if vs is None else vs
    return [ks.data_ptr(), ks.stride(0), ks.stride(1), vs.data_ptr(), vs.stride(0), vs.stride(1)]


def _check_op_args(payload, offsets, freq, table_id, N, lut, lut_per_segment, s_tok, s_ch, z_ch, segments, layout,
                   slots, status) -> None:
    """Metadata checks of a direct op call (engines may call ``torch.ops.kvkernels.rans_decode_pages``
    with their own buffers): every extent the kernel indexes by, before the launch."""
    S, C = table_id.shape
    K, bins = freq.shape
    want = {"offsets": (offsets, (S * ((C + 31) // 32) + 1,), torch.int64),
            "lut": (lut, (S if lut_per_segment else K, bins), torch.float32),
            "segments": (segments, (S, 3), torch.int64), "status": (status, (1,), torch.int32),
            "s_tok": (s_tok, (S, N), torch.float32), "s_ch": (s_ch, (S, C), torch.float32),
            "z_ch": (z_ch, (S, C), torch.float32), "table_id": (table_id, (S, C), torch.int32),
            "freq": (freq, (K, bins), torch.int32), "payload": (payload, (payload.numel(),), torch.uint8)}
    for name, (t, shape, dtype) in want.items():
        if t is None:
            continue
        if tuple(t.shape) != shape or t.dtype != dtype or not t.is_contiguous() or t.device != layout.device:
            raise ValueError(f"{name}: expected a contiguous {dtype} tensor of shape {shape} on {layout.device}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")
    if C != layout.num_heads * layout.head_dim or not 1 <= bins <= 256 or N < 1:
        raise ValueError(f"table_id: C = {C} must be the layout's heads x head_dim "
                         f"({layout.num_heads * layout.head_dim}); bins {bins} in [1, 256]; N {N} >= 1")
    if slots.dim() != 1 or slots.dtype not in (torch.int32, torch.int64) or not slots.is_contiguous():
        raise ValueError(f"slots: expected a contiguous int32/int64 [T] tensor, got {slots.dtype} {tuple(slots.shape)}")


def rans_decode_pages_into(payload, offsets, freq, table_id, prob_bits, N, lut, lut_per_segment, s_tok, s_ch, z_ch,
                           segments, layout, slots, cache_scale, status) -> None:
    _check_op_args(payload, offsets, freq, table_id, N, lut, lut_per_segment, s_tok, s_ch, z_ch, segments, layout,
                   slots, status)
    S, C = table_id.shape
    cum, ok = _codec._prep(freq, prob_bits)
    p = _codec._p
    aligned = all(b.data_ptr() % 16 == 0 for b in layout.bases)
    _codec._ext().codec_rans_decode_pages(
        p(payload), payload.numel(), p(offsets), p(cum), p(ok), freq.shape[0], freq.shape[1], p(table_id), prob_bits,
        S, N, C, p(lut), bool(lut_per_segment), p(s_tok), p(s_ch), p(z_ch), p(segments), layout.spec(),
        layout.ptrs.data_ptr(), aligned, _scales(layout, cache_scale), p(slots), slots.dtype == torch.int64,
        slots.numel(), p(status), *_codec._dev(status))
