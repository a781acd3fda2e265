"""CUDA backend of the entropy coders: launchers over ``kvkernels._C`` (csrc/codec.{h,cu}).

Same functions and conventions as ``kvkernels/reference/codec.py`` (the spec): every tensor
contiguous and on one CUDA device (the public wrappers in ``kvkernels/codec/coders.py`` check);
``status`` int32 ``[1]`` is OR-ed by the kernels (the caller zeroes it). Encoding writes each
stream into a worst-case scratch slot, a device prefix sum (``torch.cumsum``) gives the offsets,
and a pack kernel copies the streams into ``out``: no host sync. Kernels run on torch's current
stream of the tensors' device.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..reference import codec as _ref

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _ext():
    from .. import _C  # lazy: the package imports without the extension

    return _C


def available() -> Optional[str]:
    from . import quant

    why = quant.available()
    if why is None and not hasattr(_ext(), "codec_rans_decode_dequant"):
        return "kvkernels._C was built without the codec kernels (rebuild it)"
    return why


def supports(t: torch.Tensor, *args) -> Optional[str]:
    if t.device.type != "cuda":
        return f"the CUDA coders need CUDA tensors (got one on {t.device})"
    if not hasattr(_ext(), "codec_rans_decode_dequant"):
        return "kvkernels._C was built without the codec kernels (rebuild it)"
    return None


def _p(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _dev(t: torch.Tensor):
    return t.device.index, torch.cuda.current_stream(t.device).cuda_stream


def _scan(lens: torch.Tensor, offsets: torch.Tensor) -> None:
    offsets[:1].zero_()
    torch.cumsum(lens, 0, out=offsets[1:])


def ac_encode_into(symbols, cdf, table_id, out, offsets, status) -> None:
    S, N, C = symbols.shape
    cap = _ref.ac_stream_capacity(N)
    n = S * C
    if out.numel() < n * cap:
        raise ValueError(f"out: expected >= {n * cap} bytes (worst case), got {out.numel()}")
    scratch = torch.empty(n * cap, dtype=torch.uint8, device=symbols.device)
    lens = torch.empty(n, dtype=torch.int64, device=symbols.device)
    _C = _ext()
    _C.codec_ac_encode(_p(symbols), S, N, C, _p(cdf), cdf.shape[0], cdf.shape[1] - 1, _p(table_id), _p(scratch), cap,
                       _p(lens), _p(status), *_dev(symbols))
    _scan(lens, offsets)
    _C.codec_pack(_p(scratch), n, cap, False, _p(lens), _p(offsets), _p(out), out.numel(), *_dev(symbols))


def ac_decode_into(payload, offsets, cdf, table_id, out, status) -> None:
    S, N, C = out.shape
    _ext().codec_ac_decode(_p(payload), payload.numel(), _p(offsets), _p(cdf), cdf.shape[0], cdf.shape[1] - 1,
                           _p(table_id), S, N, C, _p(out), _p(status), *_dev(out))


def _prep(freq, prob_bits):
    K, bins = freq.shape
    cum = torch.empty((K, bins + 1), dtype=torch.int16, device=freq.device)
    ok = torch.empty(K, dtype=torch.uint8, device=freq.device)
    _ext().codec_rans_prep(_p(freq), K, bins, prob_bits, _p(cum), _p(ok), *_dev(freq))
    return cum, ok


def rans_encode_into(symbols, freq, table_id, prob_bits, out, offsets, status) -> None:
    S, N, C = symbols.shape
    G = _ref.n_groups(C)
    cap = _ref.rans_block_capacity(N, _ref.LANES)
    if out.numel() < S * _ref.rans_block_capacity(N, C):
        raise ValueError(f"out: expected >= {S * _ref.rans_block_capacity(N, C)} bytes (worst case), "
                         f"got {out.numel()}")
    cum, ok = _prep(freq, prob_bits)
    scratch = torch.empty(S * G * cap, dtype=torch.uint8, device=symbols.device)
    lens = torch.empty(S * G, dtype=torch.int64, device=symbols.device)
    _C = _ext()
    _C.codec_rans_encode(_p(symbols), S, N, C, _p(cum), _p(ok), freq.shape[0], freq.shape[1], _p(table_id),
                         prob_bits, _p(scratch), cap, _p(lens), _p(status), *_dev(symbols))
    _scan(lens, offsets)
    _C.codec_pack(_p(scratch), S * G, cap, True, _p(lens), _p(offsets), _p(out), out.numel(), *_dev(symbols))


def rans_decode_into(payload, offsets, freq, table_id, prob_bits, out, status) -> None:
    S, N, C = out.shape
    cum, ok = _prep(freq, prob_bits)
    _ext().codec_rans_decode(_p(payload), payload.numel(), _p(offsets), _p(cum), _p(ok), freq.shape[0],
                             freq.shape[1], _p(table_id), prob_bits, S, N, C, _p(out), 0, 0, 0, 0, 0, 0, 0,
                             _p(status), *_dev(out))


def _check_dequant_op(offsets, freq, table_id, lut, s_tok, s_ch, z_ch, out, lut_per_segment) -> None:
    """Extents the fused kernel indexes by (a direct op call brings its own buffers)."""
    S, N, C = out.shape
    K, bins = freq.shape
    for name, t, shape in (("offsets", offsets, (S * _ref.n_groups(C) + 1,)), ("table_id", table_id, (S, C)),
                           ("lut", lut, (S if lut_per_segment else K, bins)), ("s_tok", s_tok, (S, N)),
                           ("s_ch", s_ch, (S, C)), ("z_ch", z_ch, (S, C))):
        if t is not None and (tuple(t.shape) != shape or not t.is_contiguous()):
            raise ValueError(f"{name}: expected a contiguous tensor of shape {shape}, got {tuple(t.shape)}")
    if out.dtype not in _DTYPE_CODE or (out.stride(-1) != 1 and C > 1):
        raise ValueError(f"out: expected fp32/fp16/bf16 with a dense last dim, got {out.dtype} {out.stride()}")


def rans_decode_dequant_into(payload, offsets, freq, table_id, prob_bits, lut, s_tok, s_ch, z_ch, out,
                             status, lut_per_segment=False) -> None:
    _check_dequant_op(offsets, freq, table_id, lut, s_tok, s_ch, z_ch, out, lut_per_segment)
    S, N, C = out.shape
    cum, ok = _prep(freq, prob_bits)
    _ext().codec_rans_decode_dequant(_p(payload), payload.numel(), _p(offsets), _p(cum), _p(ok), freq.shape[0],
                                     freq.shape[1], _p(table_id), prob_bits, S, N, C, _p(out), _p(lut),
                                     bool(lut_per_segment), _p(s_tok), _p(s_ch), _p(z_ch), _DTYPE_CODE[out.dtype],
                                     out.stride(0), out.stride(1), _p(status), *_dev(out))
