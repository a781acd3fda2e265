"""Entropy coders of the KV codec: public API, ``torch.library`` ops and dispatch.

Two coders over the same symbols ``uint8 [S, N, C]`` (S independent segments, e.g. (layer, K/V,
chunk); N tokens; C channels) and ``table_id int32 [S, C]`` selecting a row of a table bank. The
byte layout of each is specified in docs/codec-spec.md (section "Coders"), executable in
``kvkernels/reference/codec.py``; CPU (``kvkernels._codec_cpu``) and GPU (``kvkernels._C``)
produce identical bytes.

* :func:`ac_encode` / :func:`ac_decode`: torchac-compatible arithmetic coding, one stream per
  (segment, channel) (``offsets`` int64 ``[S*C + 1]``).
* :func:`rans_encode` / :func:`rans_decode`: interleaved rANS, one 32-lane block per (segment,
  32-channel group) (``offsets`` int64 ``[S*ceil(C/32) + 1]``).
* :func:`rans_decode_dequant`: rANS decode fused with the generic dequantization map
  ``x[s,n,c] = lut[table_id[s,c], sym] * s_tok[s,n] * s_ch[s,c] + z_ch[s,c]``.

Untrusted input: every decoder bounds its reads by the payload and its writes by the output;
malformed payloads, offsets or tables raise :class:`CoderError` (a ``ValueError``) after the
kernel reports them in a status word (the only device sync of a decode; pass ``status=`` to
skip it and read the status yourself: 0 = success, bits ``reference.codec.ERR_*``).

Ops (``torch.library``, mutating caller buffers, fake kernels for graphs): ``kvkernels::ac_encode``,
``ac_decode``, ``rans_encode``, ``rans_decode``, ``rans_decode_dequant``; backends ``cuda`` (GPU
kernels), ``torch`` (reference; CPU tensors run the C++ CPU coder when built) and ``triton``
(refuses: entropy decoding is sequential per lane).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import dispatch
from ..reference import codec as _ref

LANES = _ref.LANES
MAX_PROB_BITS = _ref.MAX_PROB_BITS
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_OPS = ("ac_encode", "ac_decode", "rans_encode", "rans_decode", "rans_decode_dequant")
for _b, _mod in (("cuda", "kvkernels.cuda.codec"), ("triton", "kvkernels.triton_kernels.codec"),
                 ("torch", "kvkernels.reference.codec")):
    for _op in _OPS:
        dispatch.register(_op, _b, _mod, f"{_op}_into", None if _b == "torch" else "supports")


class CoderError(ValueError):
    """A payload, its offsets or a table is malformed (the message says which)."""


def _resolve(op: str, t: torch.Tensor, backend: Optional[str]):
    _, impl = dispatch.resolve(op, (t.device,), (t,), backend, t.device.type)
    return impl


# ---- torch.library ops (caller-owned outputs; fakes do nothing) ------------------------------
@torch.library.custom_op("kvkernels::ac_encode", mutates_args=("out", "offsets", "status"))
def ac_encode_op(symbols: torch.Tensor, cdf: torch.Tensor, table_id: torch.Tensor, out: torch.Tensor,
                 offsets: torch.Tensor, status: torch.Tensor, backend: Optional[str]) -> None:
    """symbols u8 [S,N,C] -> payload in out[:offsets[-1]], offsets i64 [S*C+1], status i32 [1]."""
    _resolve("ac_encode", symbols, backend)(symbols, cdf, table_id, out, offsets, status)


@torch.library.custom_op("kvkernels::ac_decode", mutates_args=("out", "status"))
def ac_decode_op(payload: torch.Tensor, offsets: torch.Tensor, cdf: torch.Tensor, table_id: torch.Tensor,
                 out: torch.Tensor, status: torch.Tensor, backend: Optional[str]) -> None:
    """payload u8 [B], offsets i64 [S*C+1] -> out u8 [S,N,C], status i32 [1]."""
    _resolve("ac_decode", out, backend)(payload, offsets, cdf, table_id, out, status)


@torch.library.custom_op("kvkernels::rans_encode", mutates_args=("out", "offsets", "status"))
def rans_encode_op(symbols: torch.Tensor, freq: torch.Tensor, table_id: torch.Tensor, prob_bits: int,
                   out: torch.Tensor, offsets: torch.Tensor, status: torch.Tensor, backend: Optional[str]) -> None:
    """symbols u8 [S,N,C] -> payload in out[:offsets[-1]], offsets i64 [S*G+1], status i32 [1]."""
    _resolve("rans_encode", symbols, backend)(symbols, freq, table_id, prob_bits, out, offsets, status)


@torch.library.custom_op("kvkernels::rans_decode", mutates_args=("out", "status"))
def rans_decode_op(payload: torch.Tensor, offsets: torch.Tensor, freq: torch.Tensor, table_id: torch.Tensor,
                   prob_bits: int, out: torch.Tensor, status: torch.Tensor, backend: Optional[str]) -> None:
    """payload u8 [B], offsets i64 [S*G+1] -> out u8 [S,N,C], status i32 [1]."""
    _resolve("rans_decode", out, backend)(payload, offsets, freq, table_id, prob_bits, out, status)


@torch.library.custom_op("kvkernels::rans_decode_dequant", mutates_args=("out", "status"))
def rans_decode_dequant_op(payload: torch.Tensor, offsets: torch.Tensor, freq: torch.Tensor,
                           table_id: torch.Tensor, prob_bits: int, lut: torch.Tensor,
                           s_tok: Optional[torch.Tensor], s_ch: Optional[torch.Tensor],
                           z_ch: Optional[torch.Tensor], out: torch.Tensor, status: torch.Tensor,
                           backend: Optional[str], lut_per_segment: bool = False) -> None:
    """payload -> out [S,N,C] float (C dense, S/N strides arbitrary), status i32 [1]; lut [K, bins]
    by table_id, or [S, bins] by segment (``lut_per_segment``)."""
    _resolve("rans_decode_dequant", out, backend)(payload, offsets, freq, table_id, prob_bits, lut, s_tok, s_ch,
                                                  z_ch, out, status, lut_per_segment)


for _op in (ac_encode_op, ac_decode_op, rans_encode_op, rans_decode_op, rans_decode_dequant_op):
    _op.register_fake(lambda *a, **k: None)


# ---- validation (metadata only) ----------------------------------------------------------------
def _tensor(name, t, dtype, dim=None, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-D tensor, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got {t.device}")
    return t.contiguous()


def _check_symbols(symbols):
    symbols = _tensor("symbols", symbols, torch.uint8, 3)
    S, N, C = symbols.shape
    if S < 1 or N < 1 or C < 1:
        raise ValueError(f"symbols: expected [S, N, C] with every dim >= 1, got {tuple(symbols.shape)}")
    return symbols


def _check_table_id(table_id, S, C, device):
    table_id = _tensor("table_id", table_id, torch.int32, 2, device)
    if tuple(table_id.shape) != (S, C):
        raise ValueError(f"table_id: expected shape {(S, C)}, got {tuple(table_id.shape)}")
    return table_id


def _check_cdf(cdf, device):
    cdf = _tensor("cdf", cdf, torch.int32, 2, device)
    if cdf.shape[0] < 1 or not 3 <= cdf.shape[1] <= 257:
        raise ValueError(f"cdf: expected [K >= 1, bins + 1] with 2 <= bins <= 256, got {tuple(cdf.shape)}")
    return cdf


def _check_freq(freq, prob_bits, device):
    freq = _tensor("freq", freq, torch.int32, 2, device)
    if freq.shape[0] < 1 or not 1 <= freq.shape[1] <= 256:
        raise ValueError(f"freq: expected [K >= 1, bins] with 1 <= bins <= 256, got {tuple(freq.shape)}")
    if not isinstance(prob_bits, int) or not 1 <= prob_bits <= MAX_PROB_BITS:
        raise ValueError(f"prob_bits: expected an int in [1, {MAX_PROB_BITS}], got {prob_bits!r}")
    return freq


def _check_payload(payload, offsets, n_streams, device):
    payload = _tensor("payload", payload, torch.uint8, 1, device)
    offsets = _tensor("offsets", offsets, torch.int64, 1, device)
    if offsets.numel() != n_streams + 1:
        raise ValueError(f"offsets: expected {n_streams + 1} entries, got {offsets.numel()}")
    return payload, offsets


def _check_N(N):
    if not isinstance(N, int) or isinstance(N, bool) or N < 1:
        raise ValueError(f"N: expected an int >= 1 (tokens per segment), got {N!r}")
    if N >= 2**31:
        raise ValueError(f"N: expected < 2^31 tokens, got {N}")


def _check_rans_blocks(payload, offsets, freq, table_id, prob_bits, device=None):
    """The rANS decoders' common inputs -> (table_id, freq, payload, offsets), checked; the
    device is ``payload``'s unless given."""
    dev = device if device is not None else (payload.device if isinstance(payload, torch.Tensor) else None)
    table_id = _tensor("table_id", table_id, torch.int32, 2, dev)
    S, C = table_id.shape
    freq = _check_freq(freq, prob_bits, dev)
    payload, offsets = _check_payload(payload, offsets, S * _ref.n_groups(C), dev)
    return table_id, freq, payload, offsets


def _check_map(lut, s_tok, s_ch, z_ch, S, N, C, freq, lut_per_segment, device):
    """The fused decode's map arguments -> (lut, [s_tok, s_ch, z_ch]), checked (float32)."""
    lut = _tensor("lut", lut, torch.float32, 2, device)
    want = (S, freq.shape[1]) if lut_per_segment else tuple(freq.shape)
    if tuple(lut.shape) != want:
        what = "[S, bins]" if lut_per_segment else "[K, bins] (as freq)"
        raise ValueError(f"lut: expected shape {what} = {want}, got {tuple(lut.shape)}")
    aux = []
    for name, t, shape in (("s_tok", s_tok, (S, N)), ("s_ch", s_ch, (S, C)), ("z_ch", z_ch, (S, C))):
        if t is not None:
            t = _tensor(name, t, torch.float32, 2, device)
            if tuple(t.shape) != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
        aux.append(t)
    return lut, aux


def _raise_on(status: torch.Tensor, what: str, status_out: Optional[torch.Tensor]) -> None:
    if status_out is not None:
        status_out.copy_(status)
        return
    code = int(status.item())
    if code:
        raise CoderError(f"{what}: {_ref.describe_status(code)} (status {code:#x})")


def _finish_encode(out, offsets, status, what):
    code = int(status.item())
    if code:
        raise CoderError(f"{what}: {_ref.describe_status(code)} (status {code:#x})")
    total = int(offsets[-1].item())
    return out[:total].clone(), offsets


# ---- public API ---------------------------------------------------------------------------------
def ac_encode(symbols: torch.Tensor, cdf: torch.Tensor, table_id: torch.Tensor, *,
              backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Arithmetic-code each (segment, channel) of ``symbols`` as one torchac stream.

    Args:
        symbols: uint8 ``[S, N, C]`` on any device.
        cdf: int32 ``[K, bins + 1]`` (2 <= bins <= 256), torchac's int16-normalized CDF rows:
            ``cdf[k, 0] == 0``, non-decreasing, entries ``< bins`` at most 65535; the last entry
            is ignored (taken as 65536). Every coded symbol must have ``cdf[k, s+1] > cdf[k, s]``.
        table_id: int32 ``[S, C]``: stream (s, c) uses row ``table_id[s, c]``.

    Returns:
        ``(payload uint8 [B], offsets int64 [S*C + 1])`` on ``symbols.device``; stream
        ``i = s*C + c`` is ``payload[offsets[i]:offsets[i+1]]``, byte-identical to
        ``torchac.encode_int16_normalized_cdf`` of ``symbols[s, :, c]``.
    """
    symbols = _check_symbols(symbols)
    S, N, C = symbols.shape
    dev = symbols.device
    cdf = _check_cdf(cdf, dev)
    table_id = _check_table_id(table_id, S, C, dev)
    out = torch.empty(S * C * _ref.ac_stream_capacity(N), dtype=torch.uint8, device=dev)
    offsets = torch.empty(S * C + 1, dtype=torch.int64, device=dev)
    status = torch.zeros(1, dtype=torch.int32, device=dev)
    ac_encode_op(symbols, cdf, table_id, out, offsets, status, backend)
    return _finish_encode(out, offsets, status, "ac_encode")


def ac_decode(payload: torch.Tensor, offsets: torch.Tensor, cdf: torch.Tensor, table_id: torch.Tensor, N: int, *,
              out: Optional[torch.Tensor] = None, status: Optional[torch.Tensor] = None,
              backend: Optional[str] = None) -> torch.Tensor:
    """Inverse of :func:`ac_encode`: ``symbols uint8 [S, N, C]`` (``S, C`` from ``table_id``).

    ``payload`` uint8 ``[B]``, ``offsets`` int64 ``[S*C + 1]``, ``cdf``/``table_id`` as for the
    encoder, all on one device. ``out``: optional contiguous uint8 ``[S, N, C]`` to write.
    ``status``: optional int32 ``[1]``; if given, the decode status is written there and no
    error is raised (no sync); otherwise a malformed input raises :class:`CoderError`.
    """
    _check_N(N)
    dev = payload.device if isinstance(payload, torch.Tensor) else None
    table_id = _tensor("table_id", table_id, torch.int32, 2, dev)
    S, C = table_id.shape
    cdf = _check_cdf(cdf, dev)
    payload, offsets = _check_payload(payload, offsets, S * C, dev)
    out = _out_symbols(out, S, N, C, dev)
    st = torch.zeros(1, dtype=torch.int32, device=dev)
    ac_decode_op(payload, offsets, cdf, table_id, out, st, backend)
    _raise_on(st, "ac_decode", status)
    return out


def rans_encode(symbols: torch.Tensor, freq: torch.Tensor, table_id: torch.Tensor, prob_bits: int = 12, *,
                backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """rANS-code ``symbols`` in interleaved 32-lane blocks, one per (segment, 32-channel group).

    Args:
        symbols: uint8 ``[S, N, C]``.
        freq: int32 ``[K, bins]`` (bins <= 256), each row summing to ``2**prob_bits``; every
            coded symbol must have ``freq > 0``.
        table_id: int32 ``[S, C]``.
        prob_bits: 1..12.

    Returns:
        ``(payload uint8 [B], offsets int64 [S*G + 1])``, ``G = ceil(C/32)``; block
        ``b = s*G + g`` is ``payload[offsets[b]:offsets[b+1]]`` (docs/codec-spec.md).
    """
    symbols = _check_symbols(symbols)
    S, N, C = symbols.shape
    dev = symbols.device
    freq = _check_freq(freq, prob_bits, dev)
    table_id = _check_table_id(table_id, S, C, dev)
    G = _ref.n_groups(C)
    out = torch.empty(S * _ref.rans_block_capacity(N, C), dtype=torch.uint8, device=dev)
    offsets = torch.empty(S * G + 1, dtype=torch.int64, device=dev)
    status = torch.zeros(1, dtype=torch.int32, device=dev)
    rans_encode_op(symbols, freq, table_id, prob_bits, out, offsets, status, backend)
    return _finish_encode(out, offsets, status, "rans_encode")


def _out_symbols(out, S, N, C, dev):
    if out is None:
        return torch.empty((S, N, C), dtype=torch.uint8, device=dev)
    out_c = _tensor("out", out, torch.uint8, 3, dev)
    if tuple(out.shape) != (S, N, C) or out_c.data_ptr() != out.data_ptr():
        raise ValueError(f"out: expected a contiguous uint8 tensor of shape {(S, N, C)}, got {tuple(out.shape)}")
    return out


def rans_decode(payload: torch.Tensor, offsets: torch.Tensor, freq: torch.Tensor, table_id: torch.Tensor, N: int,
                prob_bits: int = 12, *, out: Optional[torch.Tensor] = None, status: Optional[torch.Tensor] = None,
                backend: Optional[str] = None) -> torch.Tensor:
    """Inverse of :func:`rans_encode`: ``symbols uint8 [S, N, C]``; ``out``/``status`` as in
    :func:`ac_decode`. A block must end with every lane's state at 2^16 and every word used,
    so most corruptions are detected."""
    _check_N(N)
    table_id, freq, payload, offsets = _check_rans_blocks(payload, offsets, freq, table_id, prob_bits)
    S, C = table_id.shape
    dev = payload.device
    out = _out_symbols(out, S, N, C, dev)
    st = torch.zeros(1, dtype=torch.int32, device=dev)
    rans_decode_op(payload, offsets, freq, table_id, prob_bits, out, st, backend)
    _raise_on(st, "rans_decode", status)
    return out


def rans_decode_dequant(payload: torch.Tensor, offsets: torch.Tensor, freq: torch.Tensor, table_id: torch.Tensor,
                        N: int, prob_bits: int, lut: torch.Tensor, s_tok: Optional[torch.Tensor] = None,
                        s_ch: Optional[torch.Tensor] = None, z_ch: Optional[torch.Tensor] = None, *,
                        out: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.bfloat16,
                        status: Optional[torch.Tensor] = None, lut_per_segment: bool = False,
                        backend: Optional[str] = None) -> torch.Tensor:
    """rANS decode fused with dequantization (one kernel, no symbol buffer on the GPU).

    ``out[s, n, c] = lut[table_id[s, c], sym[s, n, c]] * s_tok[s, n] * s_ch[s, c] + z_ch[s, c]``
    in float32 (the products left to right, then the add, no FMA), rounded once to ``out.dtype``.

    Args:
        payload, offsets, freq, table_id, N, prob_bits: as for :func:`rans_decode`.
        lut: float32 ``[K, bins]`` (same K and bins as ``freq``): the level of each symbol; with
            ``lut_per_segment``, ``[S, bins]``: one level row per segment, used by all its channels
            (what a preset stores: levels per (layer, kind)); the GPU kernel then keeps no level
            rows in shared memory (the plain decode's occupancy).
        s_tok: optional float32 ``[S, N]`` (default 1); s_ch, z_ch: optional float32 ``[S, C]``
            (defaults 1 and 0).
        out: optional ``[S, N, C]`` bf16/fp16/fp32 with ``out.stride(-1) == 1`` (other strides
            arbitrary, e.g. a ``[L, T, H*D]`` view of flat KV); default a new contiguous tensor
            of ``dtype``.
        status: as in :func:`ac_decode`. Blocks that fail to decode are written as zeros.
    """
    _check_N(N)
    table_id, freq, payload, offsets = _check_rans_blocks(payload, offsets, freq, table_id, prob_bits)
    S, C = table_id.shape
    dev = payload.device
    lut, aux = _check_map(lut, s_tok, s_ch, z_ch, S, N, C, freq, lut_per_segment, dev)
    if out is None:
        if dtype not in OUT_DTYPES:
            raise TypeError(f"dtype: expected one of {[str(d) for d in OUT_DTYPES]}, got {dtype}")
        out = torch.empty((S, N, C), dtype=dtype, device=dev)
    else:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out: expected a torch.Tensor, got {type(out).__name__}")
        if out.dtype not in OUT_DTYPES:
            raise TypeError(f"out: expected dtype in {[str(d) for d in OUT_DTYPES]}, got {out.dtype}")
        if tuple(out.shape) != (S, N, C) or out.device != dev:
            raise ValueError(f"out: expected shape {(S, N, C)} on {dev}, got {tuple(out.shape)} on {out.device}")
        if out.stride(-1) != 1:
            raise ValueError(f"out: the channel dim must be dense (stride 1), got strides {out.stride()}")
    st = torch.zeros(1, dtype=torch.int32, device=dev)
    rans_decode_dequant_op(payload, offsets, freq, table_id, prob_bits, lut, *aux, out, st, backend,
                           bool(lut_per_segment))
    _raise_on(st, "rans_decode_dequant", status)
    return out


__all__ = ["CoderError", "ac_decode", "ac_encode", "rans_decode", "rans_decode_dequant", "rans_encode",
           "ac_encode_op", "ac_decode_op", "rans_encode_op", "rans_decode_op", "rans_decode_dequant_op"]
