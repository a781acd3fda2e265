"""CUDA backend of the fused rANS decode into paged caches (csrc/codec_paged.cu).

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


def rans_decode_pages_into(payload, offsets, freq, table_id, prob_bits, N, lut, lut_per_segment, s_tok, s_ch, z_ch,
                           segments, layout, slots, cache_scale, status) -> None:
    S, C = table_id.shape
    cum, ok = _codec._prep(freq, prob_bits)
    p = _codec._p
    aligned = all(b.data_ptr() % 16 == 0 for b in layout.bases)
    _codec._ext().codec_rans_decode_pages(
        p(payload), payload.numel(), p(offsets), p(cum), p(ok), freq.shape[0], freq.shape[1], p(table_id), prob_bits,
        S, N, C, p(lut), bool(lut_per_segment), p(s_tok), p(s_ch), p(z_ch), p(segments), layout.spec(),
        layout.ptrs.data_ptr(), aligned, _scales(layout, cache_scale), p(slots), slots.dtype == torch.int64,
        slots.numel(), p(status), *_codec._dev(status))
