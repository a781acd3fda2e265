"""Reference entropy coders (the executable spec; docs/codec-spec.md, section "Coders").

Two coders over the same symbols: ``uint8 [S, N, C]`` (S independent segments, e.g. (layer,
K/V, chunk); N tokens; C channels) with ``table_id int32 [S, C]`` selecting a row of a table bank.

* ``ac``: the 32-bit bitwise arithmetic coder with 16-bit CDFs of CacheGen and the ``torchac``
  package. One stream per (segment, channel), stream ``i = s*C + c``, each byte-identical to
  ``torchac.encode_int16_normalized_cdf`` of that channel's N symbols under its CDF row.
  ``cdf`` int32 ``[K, bins+1]``: the int16-normalized CDF (non-decreasing, ``cdf[k, 0] == 0``,
  entries at most 65536: a row padded past its symbols with 65536 codes like the unpadded row);
  the last entry is never read (taken as 2^16).
* ``rans``: interleaved rANS, one block per (segment, 32-channel group), block ``b = s*G + g``
  (``G = ceil(C/32)``): lane ``j`` codes channel ``32*g + j`` (``n_act = min(32, C - 32*g)``
  active lanes), 32-bit states in ``[2^16, 2^32)``, 16-bit renormalisation words, probabilities
  of ``prob_bits <= 12`` bits (``freq`` int32 ``[K, bins]``, each row summing to ``2**prob_bits``).
  Block bytes: ``n_act`` final encoder states (uint32 little-endian, lane order), then the words
  (uint16 little-endian) in decode order: token 0..N-1, within a token the lanes that renormalise
  in ascending lane order. The decoder ends with every state back at 2^16 and every word used.

Functions (CPU tensors in and out):

* ``ac_encode(symbols, cdf, table_id) -> (payload uint8 [B], offsets int64 [S*C + 1])``
* ``ac_decode(payload, offsets, cdf, table_id, N) -> symbols uint8 [S, N, C]``
* ``rans_encode(symbols, freq, table_id, prob_bits=12) -> (payload, offsets int64 [S*G + 1])``
* ``rans_decode(payload, offsets, freq, table_id, N, prob_bits=12) -> symbols``
* ``rans_decode_dequant(payload, offsets, freq, table_id, N, prob_bits, lut, s_tok, s_ch, z_ch,
  out)``: writes ``out[s, n, c] = lut[table_id[s, c], sym] * s_tok[s, n] * s_ch[s, c] + z_ch[s, c]``
  (float32 math in that order, rounded once to ``out.dtype``).

The ``*_into`` functions are the dispatch backend (``torch``): they write caller buffers and a
status word, and run the compiled CPU coder ``kvkernels._codec_cpu`` when it is built (set
``KVK_CODEC_PURE=1`` to force this file's pure-Python spec, which the tests compare with it).

Status bits (``status`` int32 ``[1]``, OR-ed; 0 = success) are ``ERR_*`` below.
"""
from __future__ import annotations

import bisect
import os
from typing import Optional, Tuple

import numpy as np
import torch

LANES = 32
RANS_L = 1 << 16          # lower bound of a rANS state (the encoder's initial state)
MAX_PROB_BITS = 12
M64 = (1 << 64) - 1

ERR_OFFSETS = 1      # offsets not monotone / outside the payload / first not 0
ERR_TABLE = 2        # a table row is malformed (cdf not monotone or > 65535; freq not summing)
ERR_TRUNCATED = 4    # a block is shorter than its states, or the decoder ran out of words
ERR_TRAILING = 8     # rANS: a final state is not 2^16, or words are left over
ERR_SYMBOL = 16      # encode: a symbol >= bins or of zero probability
ERR_CAPACITY = 32    # encode: the output buffer is too small
ERR_TABLE_ID = 64    # a table_id is outside [0, K)

ERR_NAMES = {ERR_OFFSETS: "offsets not monotone or outside the payload",
             ERR_TABLE: "a probability table is malformed",
             ERR_TRUNCATED: "a stream is truncated",
             ERR_TRAILING: "a stream does not end where its coder ends (corrupt data)",
             ERR_SYMBOL: "a symbol is outside its table or has zero probability",
             ERR_CAPACITY: "the output buffer is too small",
             ERR_TABLE_ID: "a table_id is outside the table bank"}


def describe_status(code: int) -> str:
    return "; ".join(v for k, v in ERR_NAMES.items() if code & k) or "ok"


def n_groups(C: int) -> int:
    return (C + LANES - 1) // LANES


def ac_stream_capacity(N: int) -> int:
    """Bytes an ac stream of N symbols can take at most: after renormalisation the span is
    > 2^30, a symbol of width >= 1/2^16 leaves >= 2^14 - 1, so <= 17 bits (emitted or pending)
    a symbol, plus 2 final bits and the padding."""
    return (17 * N + 2 + 7) // 8 + 1


def rans_block_capacity(N: int, n_act: int) -> int:
    """Bytes a rANS block can take at most: the states and at most one word a symbol."""
    return 4 * n_act + 2 * N * n_act


# ---- ac: one stream (pure Python; torchac's algorithm) ----------------------------------------
def _cdf_ok(row: np.ndarray, bins: int) -> bool:
    r = row[:bins].astype(np.int64)
    return bool(r[0] == 0 and np.all(r >= 0) and np.all(r <= 0x10000) and np.all(np.diff(r) >= 0))


def ac_encode_stream(syms, cdf_row) -> bytes:
    """One torchac stream: ``syms`` ints in [0, bins), ``cdf_row`` ints of length bins+1."""
    cdf_row = [int(v) for v in cdf_row]
    max_sym = len(cdf_row) - 2
    out, cache, count = bytearray(), 0, 0
    low, high, pending = 0, 0xFFFFFFFF, 0

    def put(bit):
        nonlocal cache, count
        cache = ((cache << 1) | bit) & 0xFF
        count += 1
        if count == 8:
            out.append(cache)
            count = 0

    def put_pending(bit):
        nonlocal pending
        put(bit)
        for _ in range(pending):
            put(1 - bit)
        pending = 0

    for s in syms:
        s = int(s)
        if not 0 <= s <= max_sym:
            raise ValueError(f"symbol {s} outside [0, {max_sym}]")
        span = high - low + 1
        c_low = cdf_row[s]
        c_high = 0x10000 if s == max_sym else cdf_row[s + 1]
        if c_high <= c_low:
            raise ValueError(f"symbol {s} has zero probability")
        high = (low - 1 + ((span * c_high) >> 16)) & 0xFFFFFFFF
        low = (low + ((span * c_low) >> 16)) & 0xFFFFFFFF
        while True:
            if high < 0x80000000:
                put_pending(0)
                low, high = (low << 1) & 0xFFFFFFFF, ((high << 1) | 1) & 0xFFFFFFFF
            elif low >= 0x80000000:
                put_pending(1)
                low, high = (low << 1) & 0xFFFFFFFF, ((high << 1) | 1) & 0xFFFFFFFF
            elif low >= 0x40000000 and high < 0xC0000000:
                pending += 1
                low = (low << 1) & 0x7FFFFFFF
                high = ((high << 1) | 0x80000001) & 0xFFFFFFFF
            else:
                break
    pending += 1
    put_pending(0 if low < 0x40000000 else 1)
    while count:
        put(0)
    return bytes(out)


def ac_decode_stream(data: bytes, cdf_row, n: int) -> np.ndarray:
    """Inverse of :func:`ac_encode_stream` (torchac's decoder: reads past the end give 0 bits)."""
    cdf_row = [int(v) for v in cdf_row]
    max_sym = len(cdf_row) - 2
    out = np.zeros(n, dtype=np.uint8)
    pos, cache, cached = 0, 0, 0

    def get(value):
        nonlocal pos, cache, cached
        if cached == 0:
            if pos == len(data):
                return (value << 1) & 0xFFFFFFFF
            cache, pos, cached = data[pos], pos + 1, 8
        value = ((value << 1) | ((cache >> (cached - 1)) & 1)) & 0xFFFFFFFF
        cached -= 1
        return value

    low, high, value = 0, 0xFFFFFFFF, 0
    for _ in range(32):
        value = get(value)
    for i in range(n):
        span = high - low + 1
        t = (((value - low + 1) & M64) * 0x10000 - 1) & M64  # torchac: uint64 arithmetic
        count = (t // span) & 0xFFFF                          # ... cast to uint16
        # the last symbol whose interval starts at or below count (upper bound; equals torchac's
        # binary search whenever every symbol has a non-zero width)
        s = bisect.bisect_right(cdf_row, count, 1, max_sym + 1) - 1
        out[i] = s
        if i == n - 1:
            break
        c_low = cdf_row[s]
        c_high = 0x10000 if s == max_sym else cdf_row[s + 1]
        high = (low - 1 + ((span * c_high) >> 16)) & 0xFFFFFFFF
        low = (low + ((span * c_low) >> 16)) & 0xFFFFFFFF
        while True:
            if low >= 0x80000000 or high < 0x80000000:
                low, high = (low << 1) & 0xFFFFFFFF, ((high << 1) | 1) & 0xFFFFFFFF
                value = get(value)
            elif low >= 0x40000000 and high < 0xC0000000:
                low = (low << 1) & 0x7FFFFFFF
                high = ((high << 1) | 0x80000001) & 0xFFFFFFFF
                value = get((value - 0x40000000) & 0xFFFFFFFF)
            else:
                break
    return out


# ---- rans: one block (pure Python / numpy) -----------------------------------------------------
def _cum(freq_row: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(freq_row.astype(np.int64))])


def _freq_ok(row: np.ndarray, prob_bits: int) -> bool:
    r = row.astype(np.int64)
    return bool(np.all(r >= 0) and r.sum() == (1 << prob_bits))


def rans_encode_block(sym: np.ndarray, freqs: np.ndarray, prob_bits: int) -> bytes:
    """One block: ``sym`` uint8 ``[N, n_act]`` (lane j = column j), ``freqs`` ``[n_act, bins]``."""
    N, na = sym.shape
    words = []  # (token, lane, word)
    states = []
    for j in range(na):
        f_row = freqs[j].astype(np.int64)
        c_row = _cum(f_row)
        bins = len(f_row)
        x = RANS_L
        for n in range(N - 1, -1, -1):
            s = int(sym[n, j])
            if s >= bins or f_row[s] == 0:
                raise ValueError(f"symbol {s} outside its table or of zero probability")
            f, c = int(f_row[s]), int(c_row[s])
            if x >= (f << (32 - prob_bits)):
                words.append((n, j, x & 0xFFFF))
                x >>= 16
            x = ((x // f) << prob_bits) + (x % f) + c
        states.append(x)
    words.sort()
    st = np.array(states, dtype="<u4").tobytes()
    return st + np.array([w for _, _, w in words], dtype="<u2").tobytes()


def rans_decode_block(data: bytes, freqs: np.ndarray, prob_bits: int, N: int) -> Tuple[np.ndarray, int]:
    """Inverse of :func:`rans_encode_block`: (symbols ``[N, n_act]``, status bits)."""
    na = freqs.shape[0]
    out = np.zeros((N, na), dtype=np.uint8)
    if len(data) < 4 * na or (len(data) - 4 * na) % 2:
        return out, ERR_TRUNCATED
    x = np.frombuffer(data[:4 * na], dtype="<u4").astype(np.int64)
    if np.any(x < RANS_L):
        return out, ERR_TRUNCATED
    w = np.frombuffer(data[4 * na:], dtype="<u2").astype(np.int64)
    cums = [_cum(freqs[j]) for j in range(na)]
    mask = (1 << prob_bits) - 1
    p = 0
    for n in range(N):
        for j in range(na):
            slot = int(x[j]) & mask
            cum = cums[j]
            s = int(np.searchsorted(cum, slot, side="right")) - 1
            f, c = int(cum[s + 1] - cum[s]), int(cum[s])
            out[n, j] = s
            v = f * (int(x[j]) >> prob_bits) + slot - c
            if v < RANS_L:
                if p >= len(w):
                    return out, ERR_TRUNCATED
                v = (v << 16) | int(w[p])
                p += 1
            x[j] = v
    if p != len(w) or np.any(x != RANS_L):
        return out, ERR_TRAILING
    return out, 0


# ---- whole tensors: pure-Python spec -----------------------------------------------------------
def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


def _check_offsets(off: np.ndarray, B: int) -> bool:
    return bool(off[0] == 0 and np.all(np.diff(off) >= 0) and off[-1] <= B)


def ac_encode_spec(symbols: torch.Tensor, cdf: torch.Tensor, table_id: torch.Tensor):
    sym, cdf_, tid = _np(symbols), _np(cdf), _np(table_id)
    S, N, C = sym.shape
    K, bins = cdf_.shape[0], cdf_.shape[1] - 1
    chunks, offsets = [], [0]
    for s in range(S):
        for c in range(C):
            k = int(tid[s, c])
            if not 0 <= k < K:
                raise ValueError(f"table_id[{s}, {c}] = {k} outside [0, {K})")
            if not _cdf_ok(cdf_[k], bins):
                raise ValueError(f"cdf row {k} is malformed")
            b = ac_encode_stream(sym[s, :, c], cdf_[k])
            chunks.append(b)
            offsets.append(offsets[-1] + len(b))
    payload = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8) if offsets[-1] else \
        torch.zeros(0, dtype=torch.uint8)
    return payload, torch.tensor(offsets, dtype=torch.int64)


def ac_decode_spec(payload: torch.Tensor, offsets: torch.Tensor, cdf: torch.Tensor, table_id: torch.Tensor,
                   N: int) -> Tuple[torch.Tensor, int]:
    data, off, cdf_, tid = _np(payload).tobytes(), _np(offsets), _np(cdf), _np(table_id)
    S, C = tid.shape
    K, bins = cdf_.shape[0], cdf_.shape[1] - 1
    out = np.zeros((S, N, C), dtype=np.uint8)
    status = 0
    if len(off) != S * C + 1 or not _check_offsets(off, len(data)):
        return torch.from_numpy(out), ERR_OFFSETS
    for s in range(S):
        for c in range(C):
            k = int(tid[s, c])
            if not 0 <= k < K:
                status |= ERR_TABLE_ID
                continue
            if not _cdf_ok(cdf_[k], bins):
                status |= ERR_TABLE
                continue
            i = s * C + c
            out[s, :, c] = ac_decode_stream(data[off[i]:off[i + 1]], cdf_[k], N)
    return torch.from_numpy(out), status


def rans_encode_spec(symbols: torch.Tensor, freq: torch.Tensor, table_id: torch.Tensor, prob_bits: int = 12):
    sym, fr, tid = _np(symbols), _np(freq), _np(table_id)
    S, N, C = sym.shape
    K = fr.shape[0]
    chunks, offsets = [], [0]
    for s in range(S):
        for g in range(n_groups(C)):
            c0, c1 = g * LANES, min(C, (g + 1) * LANES)
            ks = tid[s, c0:c1]
            if np.any(ks < 0) or np.any(ks >= K):
                raise ValueError(f"table_id[{s}, {c0}:{c1}] outside [0, {K})")
            if not all(_freq_ok(fr[k], prob_bits) for k in ks):
                raise ValueError(f"a freq row of table_id[{s}, {c0}:{c1}] does not sum to 2**{prob_bits}")
            b = rans_encode_block(sym[s, :, c0:c1], fr[ks], prob_bits)
            chunks.append(b)
            offsets.append(offsets[-1] + len(b))
    payload = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
    return payload, torch.tensor(offsets, dtype=torch.int64)


def rans_decode_spec(payload: torch.Tensor, offsets: torch.Tensor, freq: torch.Tensor, table_id: torch.Tensor,
                     N: int, prob_bits: int = 12) -> Tuple[torch.Tensor, int]:
    data, off, fr, tid = _np(payload).tobytes(), _np(offsets), _np(freq), _np(table_id)
    S, C = tid.shape
    K = fr.shape[0]
    G = n_groups(C)
    out = np.zeros((S, N, C), dtype=np.uint8)
    if len(off) != S * G + 1 or not _check_offsets(off, len(data)):
        return torch.from_numpy(out), ERR_OFFSETS
    status = 0
    for s in range(S):
        for g in range(G):
            c0, c1 = g * LANES, min(C, (g + 1) * LANES)
            ks = tid[s, c0:c1]
            if np.any(ks < 0) or np.any(ks >= K):
                status |= ERR_TABLE_ID
                continue
            if not all(_freq_ok(fr[k], prob_bits) for k in ks):
                status |= ERR_TABLE
                continue
            b = s * G + g
            o, st = rans_decode_block(data[off[b]:off[b + 1]], fr[ks], prob_bits, N)
            if st:
                status |= st
                continue
            out[s, :, c0:c1] = o
    return torch.from_numpy(out), status


def dequant_spec(sym: torch.Tensor, table_id: torch.Tensor, lut: torch.Tensor, s_tok: Optional[torch.Tensor],
                 s_ch: Optional[torch.Tensor], z_ch: Optional[torch.Tensor]) -> torch.Tensor:
    """The fused decode's map, float32: ``lut[table_id[s,c], sym] * s_tok[s,n] * s_ch[s,c] + z_ch[s,c]``
    (multiplications left to right, then the add; each rounded to float32, no FMA)."""
    S, N, C = sym.shape
    idx = table_id.long().unsqueeze(1).expand(S, N, C)
    return _apply_map(lut.float()[idx, sym.long()], s_tok, s_ch, z_ch)


def _apply_map(v: torch.Tensor, s_tok, s_ch, z_ch) -> torch.Tensor:
    """The map's factors on levels ``v [S, N, C]`` (float32, in order; absent factors skipped)."""
    S, N, C = v.shape
    if s_tok is not None:
        v = v * s_tok.float()[:, :N].reshape(S, N, 1)
    if s_ch is not None:
        v = v * s_ch.float().reshape(S, 1, C)
    if z_ch is not None:
        v = v + z_ch.float().reshape(S, 1, C)
    return v


def failed_blocks(payload, offsets, freq, table_id, prob_bits: int, N: int) -> Tuple[torch.Tensor, int]:
    """(bool ``[S, G]``: which rANS blocks fail to decode on their own, the OR of their status
    bits): offsets outside the payload, a bad table, a corrupt stream. The decoders write those
    blocks as zeros. Error path only (decodes block by block)."""
    S, C = table_id.shape
    G = n_groups(C)
    off = _np(offsets).astype(np.int64)
    B = payload.numel()
    bad = torch.zeros(S, G, dtype=torch.bool)
    code = 0
    for s in range(S):
        for g in range(G):
            b = s * G + g
            if off.size != S * G + 1 or not _block_ok(off, b, B):
                bad[s, g] = True
                code |= ERR_OFFSETS
                continue
            lo, hi = int(off[b]), int(off[b + 1])
            c0, c1 = g * LANES, min(C, (g + 1) * LANES)
            ks = table_id[s:s + 1, c0:c1].contiguous()
            if N == 0:
                st = _empty_block_status(_np(payload[lo:hi]).tobytes(), freq, ks[0], prob_bits)
            else:
                st_t = torch.zeros(1, dtype=torch.int32)
                one = torch.empty((1, N, c1 - c0), dtype=torch.uint8)
                part = payload[lo:hi].contiguous() if hi > lo else torch.zeros(1, dtype=torch.uint8)
                rans_decode_into(part, torch.tensor([0, hi - lo]), freq, ks, prob_bits, one, st_t)
                st = int(st_t.item())
            bad[s, g] = st != 0
            code |= st
    return bad, code


# ---- dispatch backend (torch): caller buffers + status ---------------------------------------
_EXT = {}


def _cpu_ext():
    """The compiled CPU coder, or None (not built, or ``KVK_CODEC_PURE=1``). ``KVK_CODEC_CPU_PATH``
    loads it from a given file instead (scripts/asan_codec.sh: a sanitizer build)."""
    if os.environ.get("KVK_CODEC_PURE", "") == "1":
        return None
    path = os.environ.get("KVK_CODEC_CPU_PATH", "")
    if path not in _EXT:
        mod = None
        try:
            if path:
                import importlib.util

                spec = importlib.util.spec_from_file_location("_codec_cpu", path)
                mod = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(mod)
            else:
                from .. import _codec_cpu as mod
        except ImportError:
            mod = None
        _EXT[path] = mod
    return _EXT[path]


def cpu_coder_available() -> bool:
    return _cpu_ext() is not None


_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _store(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src.to(dst.device))


def _spec_encode_into(encode, table_word: str, out, offsets, status) -> None:
    """Run a pure-Python encoder ``encode() -> (payload, offsets)`` into caller buffers: its
    ValueError becomes the status bit its message names (table_id, the table, else a symbol)."""
    try:
        payload, off = encode()
    except ValueError as e:
        status.fill_(ERR_TABLE_ID if "table_id" in str(e) else ERR_TABLE if table_word in str(e) else ERR_SYMBOL)
        offsets.zero_()
        return
    if payload.numel() > out.numel():
        status.fill_(ERR_CAPACITY)
        offsets.zero_()
        return
    out[:payload.numel()].copy_(payload)
    _store(offsets, off)
    status.fill_(0)


def _cpu_args(fn):
    """Run ``fn`` on CPU copies when any tensor argument lives elsewhere (backend='torch' on
    CUDA tensors), copying the mutated ones (the trailing outputs) back."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args):
        if all(not isinstance(a, torch.Tensor) or a.device.type == "cpu" for a in args):
            return fn(*args)
        cpu = [a.detach().cpu() if isinstance(a, torch.Tensor) else a for a in args]
        fn(*cpu)
        for a, c in zip(args, cpu):
            if isinstance(a, torch.Tensor) and a.device.type != "cpu" and not a.is_inference():
                a.copy_(c)
    return wrapper


@_cpu_args
def ac_encode_into(symbols, cdf, table_id, out, offsets, status) -> None:
    """symbols uint8 [S,N,C] contiguous; cdf int32 [K,bins+1]; table_id int32 [S,C];
    out uint8 [cap] (payload written to out[:offsets[-1]]); offsets int64 [S*C+1]; status int32 [1]."""
    ext = _cpu_ext()
    if ext is not None:
        S, N, C = symbols.shape
        st = ext.ac_encode(_ptr(symbols), S, N, C, _ptr(cdf), cdf.shape[0], cdf.shape[1] - 1, _ptr(table_id),
                           _ptr(out), out.numel(), _ptr(offsets))
        status.fill_(st)
        return
    _spec_encode_into(lambda: ac_encode_spec(symbols, cdf, table_id), "cdf", out, offsets, status)


@_cpu_args
def ac_decode_into(payload, offsets, cdf, table_id, out, status) -> None:
    """out uint8 [S,N,C] contiguous, written (zeros for streams that fail)."""
    ext = _cpu_ext()
    S, N, C = out.shape
    if ext is not None:
        st = ext.ac_decode(_ptr(payload), payload.numel(), _ptr(offsets), offsets.numel(), _ptr(cdf), cdf.shape[0],
                           cdf.shape[1] - 1, _ptr(table_id), S, N, C, _ptr(out))
        status.fill_(st)
        return
    o, st = ac_decode_spec(payload, offsets, cdf, table_id, N)
    out.copy_(o)
    status.fill_(st)


@_cpu_args
def rans_encode_into(symbols, freq, table_id, prob_bits, out, offsets, status) -> None:
    ext = _cpu_ext()
    if ext is not None:
        S, N, C = symbols.shape
        st = ext.rans_encode(_ptr(symbols), S, N, C, _ptr(freq), freq.shape[0], freq.shape[1], _ptr(table_id),
                             prob_bits, _ptr(out), out.numel(), _ptr(offsets))
        status.fill_(st)
        return
    _spec_encode_into(lambda: rans_encode_spec(symbols, freq, table_id, prob_bits), "freq", out, offsets, status)


@_cpu_args
def rans_decode_into(payload, offsets, freq, table_id, prob_bits, out, status) -> None:
    ext = _cpu_ext()
    S, N, C = out.shape
    if ext is not None:
        st = ext.rans_decode(_ptr(payload), payload.numel(), _ptr(offsets), offsets.numel(), _ptr(freq),
                             freq.shape[0], freq.shape[1], _ptr(table_id), prob_bits, S, N, C, _ptr(out))
        status.fill_(st)
        return
    o, st = rans_decode_spec(payload, offsets, freq, table_id, N, prob_bits)
    out.copy_(o)
    status.fill_(st)


@_cpu_args
def rans_decode_dequant_into(payload, offsets, freq, table_id, prob_bits, lut, s_tok, s_ch, z_ch, out,
                             status, lut_per_segment=False) -> None:
    """out [S, N, C] bf16/fp16/fp32 with out.stride(-1) == 1 (other strides arbitrary), written.
    Blocks that fail to decode are written as zeros. ``lut_per_segment``: ``lut`` is ``[S, bins]``
    (row s for every channel of segment s) instead of ``[K, bins]`` by ``table_id``."""
    S, N, C = out.shape
    ext = _cpu_ext()
    if lut_per_segment or ext is None:  # symbols (the CPU coder when built), then the map
        sym = torch.empty((S, N, C), dtype=torch.uint8)
        rans_decode_into(payload, offsets, freq, table_id, prob_bits, sym, status)
        if lut_per_segment:
            v = _apply_map(lut.float()[torch.arange(S).view(S, 1, 1), sym.long()], s_tok, s_ch, z_ch)
        else:
            v = dequant_spec(sym, table_id.long().clamp(0, lut.shape[0] - 1), lut, s_tok, s_ch, z_ch)
        if int(status.item()):  # failed blocks are zeros (as the CPU coder and the GPU kernel)
            bad, _ = failed_blocks(payload, offsets, freq, table_id, prob_bits, N)
            v = torch.where(bad.repeat_interleave(LANES, 1)[:, :C].unsqueeze(1), torch.zeros(()), v)
        out.copy_(v.to(out.dtype))
        return
    if ext is not None:
        st = ext.rans_decode_dequant(_ptr(payload), payload.numel(), _ptr(offsets), offsets.numel(), _ptr(freq),
                                     freq.shape[0], freq.shape[1], _ptr(table_id), prob_bits, S, N, C, _ptr(lut),
                                     _ptr(s_tok), _ptr(s_ch), _ptr(z_ch), _ptr(out), _DTYPE_CODE[out.dtype],
                                     out.stride(0), out.stride(1))
        status.fill_(st)
        return


# ---- decode into paged caches (docs/codec.md "Decode into pages") --------------------------
ERR_SEGMENT = 128    # decode into pages: a segment descriptor outside the caches / slot_mapping
ERR_NAMES[ERR_SEGMENT] = "a segment descriptor is outside the caches or slot_mapping"


def _block_ok(off: np.ndarray, b: int, B: int) -> bool:
    lo, hi = int(off[b]), int(off[b + 1])
    return 0 <= lo <= hi <= B and (b != 0 or lo == 0)


def _decode_group(data: bytes, off: np.ndarray, freq, tid: torch.Tensor, prob_bits: int, ns: int,
                  segs) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Symbols ``[len(segs), ns, C]`` of segments ``segs`` (all of ``ns`` tokens), per-block
    failure flags ``[len(segs), G]`` and the status bits (failed blocks: zero symbols)."""
    C = tid.shape[1]
    G = n_groups(C)
    n = len(segs)
    blocks = [s * G + g for s in segs for g in range(G)]
    good = torch.tensor([_block_ok(off, b, len(data)) for b in blocks], dtype=torch.bool).reshape(n, G)
    parts = [data[off[b]:off[b + 1]] if ok else b"" for b, ok in zip(blocks, good.flatten().tolist())]
    sub_off = torch.tensor([0] + [len(p) for p in parts], dtype=torch.int64).cumsum(0)
    sub_pay = torch.frombuffer(bytearray(b"".join(parts)) or bytearray(1), dtype=torch.uint8)
    sub_tid = tid[list(segs)].contiguous()
    sym = torch.zeros((n, ns, C), dtype=torch.uint8)
    code = 0
    if ns > 0:
        st = torch.zeros(1, dtype=torch.int32)
        rans_decode_into(sub_pay, sub_off, freq, sub_tid, prob_bits, sym, st)
        code = int(st.item())
    bad = torch.zeros(n, G, dtype=torch.bool)
    if code or ns == 0 or not bool(good.all()):  # find the failing blocks (the error path)
        bad, code = failed_blocks(sub_pay, sub_off, freq, sub_tid, prob_bits, ns)
        bad |= ~good
        code |= 0 if bool(good.all()) else ERR_OFFSETS
        sym = torch.where(bad.repeat_interleave(LANES, 1)[:, :C].unsqueeze(1), torch.zeros((), dtype=sym.dtype), sym)
    return sym, bad, code


def _empty_block_status(part: bytes, freq: torch.Tensor, ks: torch.Tensor, prob_bits: int) -> int:
    """Status of a block of 0 tokens: its tables usable, exactly n_act states of 2^16."""
    K = freq.shape[0]
    kk = ks.long()
    if bool(((kk < 0) | (kk >= K)).any()):
        return ERR_TABLE_ID
    if not all(_freq_ok(freq[int(k)].numpy(), prob_bits) for k in kk):
        return ERR_TABLE
    na = ks.numel()
    if len(part) < 4 * na or (len(part) - 4 * na) % 2:
        return ERR_TRUNCATED
    x = np.frombuffer(part[:4 * na], dtype="<u4")
    if np.any(x < RANS_L):
        return ERR_TRUNCATED
    return ERR_TRAILING if (len(part) != 4 * na or np.any(x != RANS_L)) else 0


def rans_decode_pages_into(payload, offsets, freq, table_id, prob_bits, N, lut, lut_per_segment, s_tok, s_ch, z_ch,
                           segments, layout, slots, cache_scale, status) -> None:
    """The spec of the fused decode into paged caches: decode (the reference coder), dequantize
    (the float32 map), then write as ``reference.paged.scatter``.

    Segment ``s`` = ``segments[s] = (r, t0, ns)`` (int64): its ``ns <= N`` tokens go to cache ``r``
    (``kv = r // L``, layer ``r % L`` of ``layout``), token ``n`` to slot ``slots[t0 + n]``
    (``t0 + ns <= len(slots)``); slots < 0 or >= NB * BS are skipped. Values: ``lut[row, sym] *
    s_tok[s, n] * s_ch[s, c] + z_ch[s, c]`` with ``row = table_id[s, c]`` (``lut [K, bins]``) or
    ``s`` (``lut_per_segment``, ``lut [S, bins]``); fp8 caches get ``e4m3(clamp(v / scale))``
    with the (layer, head) scale of ``cache_scale``, others ``v`` rounded to the cache dtype.
    A malformed descriptor writes nothing (``ERR_SEGMENT``); a block that fails to decode writes
    zeros at its addressed slots. ``status`` int32 ``[1]`` gets the OR of the bits."""
    from . import paged as pref

    dev = layout.device
    S, C = table_id.shape
    G = n_groups(C)
    L, H, D, x = layout.num_layers, layout.num_heads, layout.head_dim, layout.x
    seg = segments.detach().cpu().to(torch.int64)
    sl = slots.detach().cpu().to(torch.int64)
    T = sl.numel()
    data = _np(payload).tobytes()
    off = _np(offsets).astype(np.int64)
    fr, tid = freq.detach().cpu().contiguous(), table_id.detach().cpu().contiguous()
    lut_c = lut.detach().cpu().float()
    aux = [None if t is None else t.detach().cpu().float() for t in (s_tok, s_ch, z_ch)]
    code = 0
    if off.size != S * G + 1:
        code |= ERR_OFFSETS
        off = np.zeros(S * G + 1, dtype=np.int64)
    groups = {}
    for s in range(S):
        r, t0, ns = (int(v) for v in seg[s])
        if not (0 <= r < layout.num_kv * L and 0 <= ns <= N and 0 <= t0 <= T - ns):
            code |= ERR_SEGMENT
            continue
        groups.setdefault(ns, []).append(s)
    views = layout.views()
    for ns, segs in groups.items():
        sym, bad, st = _decode_group(data, off, fr, tid, prob_bits, ns, segs)
        code |= st
        if ns == 0:
            continue
        idx = torch.tensor(segs, dtype=torch.long)
        if lut_per_segment:
            v = lut_c[idx.view(-1, 1, 1), sym.long()]
        else:
            v = lut_c[tid[idx].long().clamp(0, lut_c.shape[0] - 1).unsqueeze(1), sym.long()]
        if aux[0] is not None:
            v = v * aux[0][idx, :ns].unsqueeze(2)
        if aux[1] is not None:
            v = v * aux[1][idx].unsqueeze(1)
        if aux[2] is not None:
            v = v + aux[2][idx].unsqueeze(1)
        badc = bad.repeat_interleave(LANES, dim=1)[:, :C]  # [n, C]
        v = torch.where(badc.unsqueeze(1), torch.zeros((), dtype=v.dtype), v)
        for i, s in enumerate(segs):
            r, t0, _ = (int(q) for q in seg[s])
            ss = sl[t0:t0 + ns]
            keep = torch.nonzero((ss >= 0) & (ss < layout.num_slots)).flatten()
            if keep.numel() == 0:
                continue
            blk, o = ss[keep] // layout.block_size, ss[keep] % layout.block_size
            vals = v[i, keep].reshape(-1, H, D)
            kv, l = divmod(r, L)
            y = pref.fp8_encode(vals, cache_scale[kv][l].cpu()) if layout.fp8 else vals.to(layout.dtype)
            views[r][blk.to(dev), o.to(dev)] = y.reshape(-1, H, D // x, x).to(dev)
    status.fill_(code)
