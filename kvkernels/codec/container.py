"""The codec container (format v1, docs/codec-spec.md section 2): encode, decode, inspect, verify.

The decoder treats its input as untrusted: every size, count and offset is bounded and
cross-checked against the others and against the buffer before anything is allocated, CRC32s
are checked before a coder sees a byte, and any failure is a :class:`CodecError`.
"""
from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import presets as _presets
from . import tables as _tables

MAGIC = b"KVKC"
VERSION = 1
CODERS = ("rans", "ac")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
RANS_PROB_BITS = 12
AC_PROB_BITS = 16
_FIXED = struct.Struct("<4sHHQIBBBBIIIIIIHI32s")  # 86 bytes
assert _FIXED.size == 86

MAX_L, MAX_T, MAX_H, MAX_D, MAX_C = 4096, 1 << 24, 1024, 1024, 65536
MAX_CHUNK = 1 << 20
MAX_MODEL = 256
MAX_PRESET = 64 << 10
MAX_HEADER = 16 << 20
MAX_ELEMENTS = 1 << 34          # elements one container may describe
MAX_ELEMENTS_PER_BYTE = 1 << 18  # and per byte of it (a bound far above any real stream)
LANES = 32


class CodecError(ValueError):
    """A malformed, truncated, forged or unsupported container (the message says what)."""


@dataclass(frozen=True)
class ContainerInfo:
    """What a container's header says (``inspect``) or, after ``verify``, what was checked."""

    version: int
    model: str
    preset: str
    coder: str
    L: int
    T: int
    H: int
    D: int
    dtype: torch.dtype
    chunk_tokens: int
    n_chunks: int
    nbytes: int
    table_mode: str = "chunk"
    prob_bits: int = 12
    table_hash: bytes = b""
    preset_config: Optional[dict] = None

    @property
    def elements(self) -> int:
        return 2 * self.L * self.T * self.H * self.D

    @property
    def bits_per_element(self) -> float:
        return 8.0 * self.nbytes / self.elements


# ---------------------------------------------------------------------------------------------
# helpers


def _n_streams(coder: str, C: int) -> int:
    return C if coder == "ac" else (C + LANES - 1) // LANES


def _record_seed(c: int, l: int, N: int, C: int) -> int:
    """CRC32 seed of a layer record: binds it to its chunk, layer, token and channel counts."""
    return zlib.crc32(struct.pack("<IIII", c, l, N, C))


def _coder_mod():
    from . import coders

    return coders


def _chunk_bounds(T: int, ct: int, c: int) -> Tuple[int, int]:
    return c * ct, min(T, (c + 1) * ct)


def _n_exact(spec, T: int, ct: int, c: int) -> int:
    """Exact tokens of chunk ``c`` (global positions < ``spec.exact``)."""
    t0, t1 = _chunk_bounds(T, ct, c)
    return max(0, min(spec.exact, t1) - t0)


_NP_DT = {torch.float32: ("<f4", 4), torch.float16: ("<f2", 2), torch.bfloat16: ("<u2", 2)}


def _raw_bytes(x: torch.Tensor) -> bytes:
    x = x.detach().cpu().contiguous()
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().astype("<i2").tobytes()
    return x.numpy().astype(_NP_DT[x.dtype][0]).tobytes()


def _raw_tensor(b, dtype: torch.dtype, shape) -> torch.Tensor:
    import numpy as np

    code, _ = _NP_DT[dtype]
    a = np.frombuffer(b, dtype=code).copy()
    t = torch.from_numpy(a)
    if dtype == torch.bfloat16:
        t = t.view(torch.int16).view(torch.bfloat16)
    elif dtype == torch.float16:
        t = t.view(torch.float16) if t.dtype != torch.float16 else t
    return t.reshape(shape)


def _tables_for(bank: Optional[_tables.Bank], kind: int, layer: int, C: int, bins: int, pb: int) -> torch.Tensor:
    """freq int32 [C, bins] of the shared bank (rows per channel, or one row broadcast)."""
    counts = bank.counts[kind, layer, :, :bins]
    f = _tables.normalize(counts, bins, pb)
    if f.shape[0] == 1:
        f = f.expand(C, bins).contiguous()
    return f


# ---------------------------------------------------------------------------------------------
# encode


def encode(kv: torch.Tensor, preset="default", *, chunk_tokens: int = 256, coder: str = "rans",
           model: str = "") -> bytes:
    """Compress flat KV into one self-delimiting container.

    Args:
        kv: ``[2, L, T, H, D]`` (K then V), float32/float16/bfloat16, any device, any strides.
        preset: ``"default"``, ``"cachegen"`` or a :class:`~kvkernels.codec.presets.Preset`.
        chunk_tokens: tokens per chunk (the unit of tables/statistics and of partial decode).
        coder: ``"rans"`` (default) or ``"ac"`` (torchac-compatible arithmetic coding).
        model: model name stored in the header (UTF-8, <= 256 bytes); presets with shared
            tables use the registered bank of this model (``tables.bank_for``) and fall back to
            per-chunk tables when there is none.

    Returns:
        ``bytes``: the container (docs/codec-spec.md section 2).
    """
    if not isinstance(kv, torch.Tensor):
        raise TypeError(f"kv: expected a torch.Tensor, got {type(kv).__name__}")
    if kv.dtype not in DTYPES:
        raise TypeError(f"kv: expected dtype float32, float16 or bfloat16, got {kv.dtype}")
    if kv.dim() != 5 or kv.shape[0] != 2:
        raise ValueError(f"kv: expected shape [2, L, T, H, D], got {tuple(kv.shape)}")
    _, L, T, H, D = kv.shape
    for name, v, hi in (("L", L, MAX_L), ("T", T, MAX_T), ("H", H, MAX_H), ("D", D, MAX_D)):
        if not 1 <= v <= hi:
            raise ValueError(f"kv: {name} = {v} outside [1, {hi}]")
    C = H * D
    if C > MAX_C:
        raise ValueError(f"kv: H * D = {C} > {MAX_C}")
    if type(chunk_tokens) is not int or not 1 <= chunk_tokens <= MAX_CHUNK:
        raise ValueError(f"chunk_tokens: expected an int in [1, {MAX_CHUNK}], got {chunk_tokens!r}")
    if coder not in CODERS:
        raise ValueError(f"coder: expected one of {CODERS}, got {coder!r}")
    if not isinstance(model, str):
        raise TypeError(f"model: expected a str, got {type(model).__name__}")
    mb = model.encode("utf-8")
    if len(mb) > MAX_MODEL:
        raise ValueError(f"model: at most {MAX_MODEL} UTF-8 bytes, got {len(mb)}")
    P = _presets.get(preset, L, model)
    if P.bins_max() > 256:
        raise ValueError("preset: bins > 256")
    if not bool(torch.isfinite(kv).all()):
        raise ValueError("kv: contains NaN or infinity")
    bank = None
    if P.tables == "shared":
        bank = _tables.bank_for(model, L, C)
        if bank is not None and bank.bins_max < P.bins_max():
            bank = None
    table_mode = 1 if bank is not None else 0
    pb = RANS_PROB_BITS if coder == "rans" else AC_PROB_BITS
    pjson = P.to_json()
    co = _coder_mod()

    ct = chunk_tokens
    nc = (T + ct - 1) // ct
    nf = T // ct
    x = kv.detach().to(torch.float32)
    dev = x.device
    # segments of (kind, layer, chunk) grouped by token count (the full chunks; the shorter last
    # one): the symbols and tables of a group go to the coder in one call (rANS; one per
    # (kind, layer) for ac), and everything the records need comes to the host in a few copies
    spans = []
    if nf:
        spans.append((list(range(nf)), 0, nf * ct, ct))
    if T > nf * ct:
        spans.append(([nf], nf * ct, T, T - nf * ct))
    bins_max = P.bins_max()
    # parts[c][l][k] = the bytes of the record's kind part
    parts: List[List[List[bytes]]] = [[[b"", b""] for _ in range(L)] for _ in range(nc)]
    for cidx, t_lo, t_hi, N in spans:
        S = len(cidx)
        items = []  # (k, l, sym [S, N, C], side, freq [S*C or C, bins_max] rows, bins)
        for k in range(2):
            spec = P.kind(k)
            for l in range(L):
                bins = spec.bins[l]
                seg = x[k, l, t_lo:t_hi].reshape(S, N, C)
                if spec.exact:  # exact tokens (the sink): the quantizer sees their chunk's mean
                    seg = seg.clone()
                    for i, c in enumerate(cidx):
                        seg[i] = _presets.neutralize(seg[i], spec.exact - c * ct)
                sym, side = _presets.quantize(seg, spec, l)
                if table_mode == 0:
                    cnt = torch.zeros(S * C, bins_max, dtype=torch.int64, device=dev)
                    cnt.scatter_add_(1, sym.permute(0, 2, 1).reshape(S * C, N).long(),
                                     torch.ones(S * C, N, dtype=torch.int64, device=dev))
                    freq = _tables.normalize(cnt, bins, pb)  # zeros past bins
                else:
                    freq = torch.nn.functional.pad(_tables_for(bank, k, l, C, bins, pb), (0, bins_max - bins)).to(dev)
                items.append((k, l, sym, side, freq, bins))
        batches = [items] if coder == "rans" else [[it] for it in items]
        coded = {}  # (k, l) -> (payload bytes, stream offsets of its batch, its first stream)
        ns = _n_streams(coder, C)
        for batch in batches:
            nb = len(batch)
            sym = torch.cat([it[2] for it in batch], 0)
            freq = torch.cat([it[4] for it in batch], 0)
            if table_mode == 0:  # per-chunk tables: segment s uses rows s*C .. s*C + C - 1
                tid = torch.arange(nb * S * C, dtype=torch.int32, device=dev).reshape(nb * S, C)
            else:  # item j's C bank rows, for each of its S segments
                tid = (torch.arange(nb, dtype=torch.int32, device=dev)[:, None, None] * C
                       + torch.arange(C, dtype=torch.int32, device=dev)).expand(nb, S, C).reshape(nb * S, C)
            if coder == "rans":
                payload, offs = co.rans_encode(sym.contiguous(), freq.contiguous(), tid, pb)
            else:  # one (kind, layer) a batch: its own bins
                payload, offs = co.ac_encode(sym.contiguous(), _tables.cdf_from_freq(freq[:, :batch[0][5]]), tid)
            pay = payload.cpu().numpy().tobytes()
            offs = offs.tolist()
            for j, it in enumerate(batch):
                coded[(it[0], it[1])] = (pay, offs, j * S * ns)
        # side info and per-chunk tables to the host in one copy each
        side_all = torch.cat([v.reshape(-1).view(torch.int16) for it in items for v in it[3].values()]).cpu()
        side_np = side_all.numpy().astype("<i2")
        freq_np = None
        if table_mode == 0 and pb <= 16:
            freq_np = torch.cat([it[4] for it in items], 0).cpu().numpy().astype("<u2")
        spos = 0
        frow = 0
        for k, l, sym, side, freq, bins in items:
            spec = P.kind(k)
            side_b = {}
            for n, v in side.items():  # each [S, per]: chunk i's slice
                per = v.numel() // S
                side_b[n] = [side_np[spos + i * per: spos + (i + 1) * per].tobytes() for i in range(S)]
                spos += v.numel()
            pay, offs, s0 = coded[(k, l)]
            for i, c in enumerate(cidx):
                out = bytearray()
                for name, _axis in _presets.side_names(spec):
                    out += side_b[name][i]
                if table_mode == 0 and freq_np is not None:
                    out += freq_np[frow + i * C: frow + (i + 1) * C, :bins].tobytes()
                so = offs[s0 + i * ns: s0 + (i + 1) * ns + 1]
                lens = [so[j + 1] - so[j] for j in range(ns)]
                width = 2 if max(lens) < 65536 else 4
                out += struct.pack("<B", width)
                out += struct.pack(f"<{ns}{'H' if width == 2 else 'I'}", *lens)
                out += pay[so[0]:so[-1]]
                e = _n_exact(spec, T, ct, c)
                if e:  # post-pass data: the exact tokens raw, in the KV dtype, [e, C]
                    t0 = c * ct
                    out += _raw_bytes(kv[k, l, t0:t0 + e].reshape(e, C))
                parts[c][l][k] = bytes(out)
            frow += freq.shape[0]
    # assemble
    chunks = []
    for c in range(nc):
        recs = []
        for l in range(L):
            r = parts[c][l][0] + parts[c][l][1]
            t0, t1 = _chunk_bounds(T, ct, c)
            recs.append(r + struct.pack("<I", zlib.crc32(r, _record_seed(c, l, t1 - t0, C))))
        dlen = 8 * (L + 1)
        offs = [dlen]
        for r in recs:
            offs.append(offs[-1] + len(r))
        d = struct.pack(f"<{L + 1}Q", *offs)
        body = d + b"".join(recs)
        chunks.append(body + struct.pack("<I", zlib.crc32(d)))
    hlen = _FIXED.size + len(mb) + len(pjson) + 16 * nc + 4
    total = hlen + sum(len(c) for c in chunks) + 4
    fixed = _FIXED.pack(MAGIC, VERSION, 0, total, hlen, CODERS.index(coder), DTYPES.index(kv.dtype), pb,
                        table_mode, L, T, H, D, ct, nc, len(mb), len(pjson),
                        bank.hash if bank is not None else bytes(32))
    dirs = []
    off = hlen
    for ch in chunks:
        dirs.append(struct.pack("<QQ", off, len(ch)))
        off += len(ch)
    head = fixed + mb + pjson + b"".join(dirs)
    head += struct.pack("<I", zlib.crc32(head))
    body = head + b"".join(chunks)
    return body + struct.pack("<I", zlib.crc32(body))


def _decode_flat_pages(data, info: ContainerInfo, dtype, device, layers: range, chunks: range, T: int):
    """rANS on a GPU: the whole decode as one fused decode-dequantize launch for every (chunk,
    layer, K/V) segment, writing the flat output through a one-block paged layout (block =
    the decoded tokens, slot i = token i); the same values as the per-record path (decode to
    float32, then one rounding to ``dtype``). None when the kernel is not available here."""
    from ..cuda import codec_paged as _cp  # noqa: WPS433 (lazy: the codec imports without CUDA)
    from ..layouts import PagedLayout
    from . import paged as _cpaged

    out = torch.empty(2, len(layers), T, info.H, info.D, dtype=dtype, device=device)
    lay = PagedLayout.from_tensors([out[0, i].unsqueeze(0) for i in range(len(layers))],
                                   [out[1, i].unsqueeze(0) for i in range(len(layers))], engine="flat")
    if _cp.supports(lay) is not None:
        return None
    slots = torch.arange(T, dtype=torch.int32, device=device)
    _cpaged.decode_into_pages(data, lay, slots, layers=layers, chunks=chunks, backend="cuda")
    return out


# ---------------------------------------------------------------------------------------------
# parsing (untrusted)


@dataclass
class _Header:
    info: ContainerInfo
    preset: _presets.Preset
    bank: Optional[_tables.Bank]
    chunk_dir: List[Tuple[int, int]]


def _as_bytes(data) -> memoryview:
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8 or data.dim() != 1:
            raise TypeError("data: expected bytes or a 1-D uint8 tensor")
        data = data.cpu().numpy().tobytes()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data: expected bytes, got {type(data).__name__}")
    mv = memoryview(data)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    return mv


def _parse_header(mv: memoryview, need_bank: bool = True) -> _Header:
    n = len(mv)
    if n < _FIXED.size + 8:
        raise CodecError(f"container truncated: {n} bytes is shorter than a header")
    (magic, ver, flags, total, hlen, coder, dt, pb, tmode, L, T, H, D, ct, nc, ml, pl,
     thash) = _FIXED.unpack_from(mv, 0)
    if magic != MAGIC:
        raise CodecError("not a kvkernels codec container (bad magic)")
    if ver != VERSION:
        raise CodecError(f"unsupported container version {ver} (this decoder reads version {VERSION})")
    if flags != 0:
        raise CodecError(f"unknown header flags {flags:#x}")
    if total != n:
        raise CodecError(f"container length mismatch: header says {total} bytes, got {n}")
    if coder >= len(CODERS):
        raise CodecError(f"unknown coder id {coder}")
    cname = CODERS[coder]
    if dt >= len(DTYPES):
        raise CodecError(f"unknown dtype id {dt}")
    if (cname == "rans" and not 8 <= pb <= RANS_PROB_BITS) or (cname == "ac" and pb != AC_PROB_BITS):
        raise CodecError(f"prob_bits {pb} invalid for coder {cname}")
    if tmode not in (0, 1):
        raise CodecError(f"unknown table mode {tmode}")
    for name, v, hi in (("L", L, MAX_L), ("T", T, MAX_T), ("H", H, MAX_H), ("D", D, MAX_D),
                        ("chunk_tokens", ct, MAX_CHUNK)):
        if not 1 <= v <= hi:
            raise CodecError(f"header field {name} = {v} outside [1, {hi}]")
    if H * D > MAX_C:
        raise CodecError(f"header: H * D = {H * D} > {MAX_C}")
    if nc != (T + ct - 1) // ct:
        raise CodecError(f"header: n_chunks = {nc}, expected ceil(T / chunk_tokens) = {(T + ct - 1) // ct}")
    elements = 2 * L * T * H * D
    if elements > MAX_ELEMENTS or elements > MAX_ELEMENTS_PER_BYTE * n:
        raise CodecError(f"header claims {elements} elements, too many for a {n}-byte container")
    if ml > MAX_MODEL or pl > MAX_PRESET or pl == 0:
        raise CodecError("header: model or preset length out of range")
    want_hlen = _FIXED.size + ml + pl + 16 * nc + 4
    if hlen != want_hlen or hlen > MAX_HEADER or hlen + 4 > n:
        raise CodecError(f"header length {hlen} inconsistent (expected {want_hlen}, container {n} bytes)")
    if zlib.crc32(mv[: hlen - 4]) != struct.unpack_from("<I", mv, hlen - 4)[0]:
        raise CodecError("header checksum mismatch")
    p = _FIXED.size
    try:
        model = bytes(mv[p:p + ml]).decode("utf-8")
    except UnicodeDecodeError:
        raise CodecError("header: model name is not UTF-8") from None
    p += ml
    try:
        preset = _presets.Preset.from_json(bytes(mv[p:p + pl]), L)
    except _presets.PresetError as e:
        raise CodecError(f"header: bad preset: {e}") from None
    p += pl
    if preset.bins_max() > (1 << pb) // 2:
        raise CodecError("header: preset bins too many for prob_bits")
    chunk_dir = []
    expect = hlen
    min_chunk = 8 * (L + 1) + 4 + L * 4
    for c in range(nc):
        off, ln = struct.unpack_from("<QQ", mv, p + 16 * c)
        if off != expect or ln < min_chunk or off + ln > n - 4:
            raise CodecError(f"chunk directory entry {c} out of bounds (offset {off}, length {ln})")
        chunk_dir.append((off, ln))
        expect = off + ln
    if expect != n - 4:
        raise CodecError("chunk directory does not cover the container")
    bank = None
    if tmode == 1:
        bank = _tables.lookup(thash)
        if bank is None:
            if need_bank:
                raise CodecError(f"unknown shared table bank {thash.hex()[:16]}... (register it with "
                                 "kvkernels.codec.tables.register_bank)")
        elif bank.L != L or bank.channels not in (1, H * D) or bank.bins_max < preset.bins_max():
            raise CodecError("shared table bank does not match the container's shape or bins")
    elif any(thash):
        raise CodecError("header: table hash set without shared tables")
    info = ContainerInfo(VERSION, model, preset.name, cname, L, T, H, D, DTYPES[dt], ct, nc, n,
                         ("chunk", "shared")[tmode], pb, bytes(thash), preset.to_config())
    return _Header(info, preset, bank, chunk_dir)


def _layer_dir(mv: memoryview, h: _Header, c: int) -> List[int]:
    off, ln = h.chunk_dir[c]
    L = h.info.L
    dl = 8 * (L + 1)
    if zlib.crc32(mv[off:off + dl]) != struct.unpack_from("<I", mv, off + ln - 4)[0]:
        raise CodecError(f"chunk {c}: layer directory checksum mismatch")
    d = list(struct.unpack_from(f"<{L + 1}Q", mv, off))
    if d[0] != dl or d[-1] != ln - 4 or any(d[i + 1] < d[i] + 4 for i in range(L)):
        raise CodecError(f"chunk {c}: layer directory out of bounds")
    return [off + v for v in d]


class _Reader:
    def __init__(self, mv: memoryview, start: int, end: int, what: str):
        self.mv, self.p, self.end, self.what = mv, start, end, what

    def take(self, nbytes: int) -> memoryview:
        if nbytes < 0 or self.p + nbytes > self.end:
            raise CodecError(f"{self.what}: truncated (needs {nbytes} more bytes)")
        v = self.mv[self.p:self.p + nbytes]
        self.p += nbytes
        return v


def _parse_record(mv, h: _Header, c: int, l: int, start: int, end: int):
    """[(side dict of float16 tensors, freq or None, lengths list, payload bytes)] for K and V."""
    info = h.info
    t0, t1 = _chunk_bounds(info.T, info.chunk_tokens, c)
    N, C = t1 - t0, info.H * info.D
    if zlib.crc32(mv[start:end - 4], _record_seed(c, l, N, C)) != struct.unpack_from("<I", mv, end - 4)[0]:
        raise CodecError(f"chunk {c} layer {l}: checksum mismatch")
    ns = _n_streams(info.coder, C)
    r = _Reader(mv, start, end - 4, f"chunk {c} layer {l}")
    out = []
    import numpy as np

    for k in range(2):
        spec = h.preset.kind(k)
        bins = spec.bins[l]
        side = {}
        for name, axis in _presets.side_names(spec):
            cnt = N if axis == "n" else C
            a = np.frombuffer(r.take(2 * cnt), dtype="<i2").astype(np.int16)
            t = torch.from_numpy(a).view(torch.float16)
            if not bool(torch.isfinite(t).all()):
                raise CodecError(f"chunk {c} layer {l}: non-finite scale")
            if name in ("amax", "std", "delta") and bool((t < 0).any()):
                raise CodecError(f"chunk {c} layer {l}: negative scale")
            side[name] = t
        freq = None
        if info.table_mode == "chunk":
            a = np.frombuffer(r.take(2 * C * bins), dtype="<u2").astype(np.int32)
            freq = torch.from_numpy(a).reshape(C, bins)
            why = _tables.check_freq(freq, torch.full((C,), bins), info.prob_bits)
            if why:
                raise CodecError(f"chunk {c} layer {l}: {why}")
        width = r.take(1)[0]
        if width not in (2, 4):
            raise CodecError(f"chunk {c} layer {l}: bad stream length width {width}")
        lens = list(struct.unpack(f"<{ns}{'H' if width == 2 else 'I'}", r.take(width * ns)))
        payload = bytes(r.take(sum(lens)))
        exact = None
        e = _n_exact(spec, info.T, info.chunk_tokens, c)
        if e:
            exact = _raw_tensor(bytes(r.take(_NP_DT[info.dtype][1] * e * C)), info.dtype, (e, C))
            if not bool(torch.isfinite(exact).all()):
                raise CodecError(f"chunk {c} layer {l}: non-finite exact token")
        out.append((side, freq, lens, payload, exact))
    if r.p != r.end:
        raise CodecError(f"chunk {c} layer {l}: {r.end - r.p} trailing bytes")
    return out


def _check_range(name: str, rg, n: int) -> range:
    if rg is None:
        return range(n)
    if not isinstance(rg, range):
        raise TypeError(f"{name}: expected a range or None, got {type(rg).__name__}")
    if rg.step != 1 or not (0 <= rg.start < rg.stop <= n):
        raise ValueError(f"{name}: expected a non-empty range with step 1 inside [0, {n}), got {rg}")
    return rg


# ---------------------------------------------------------------------------------------------
# decode / inspect / verify


def inspect(data) -> ContainerInfo:
    """The header's description (reads the header only; checks its CRC)."""
    mv = _as_bytes(data)
    return _parse_header(mv, need_bank=False).info


def verify(data) -> ContainerInfo:
    """Check every checksum, bound and table of the container; its :class:`ContainerInfo`."""
    mv = _as_bytes(data)
    h = _parse_header(mv)
    n = len(mv)
    if zlib.crc32(mv[: n - 4]) != struct.unpack_from("<I", mv, n - 4)[0]:
        raise CodecError("container checksum mismatch")
    for c in range(h.info.n_chunks):
        d = _layer_dir(mv, h, c)
        for l in range(h.info.L):
            _parse_record(mv, h, c, l, d[l], d[l + 1])
    return h.info


def decode(data, *, dtype: Optional[torch.dtype] = None, device="cpu", layers: Optional[range] = None,
           chunks: Optional[range] = None) -> torch.Tensor:
    """Decompress a container (or a range of its layers and chunks).

    Args:
        data: the container (``bytes``, ``bytearray``, ``memoryview`` or 1-D uint8 tensor).
        dtype: output dtype (default: the encoded KV's dtype).
        device: where the output is written (the coders run there).
        layers: ``range`` of layers to decode (default all).
        chunks: ``range`` of chunks to decode (default all); tokens are the chunks' tokens.

    Returns:
        ``[2, L', T', H, D]`` of ``dtype`` on ``device``: only the chosen layers' and chunks'
        bytes of the container are read.

    Raises:
        CodecError: malformed input; ValueError/TypeError: bad arguments.
    """
    mv = _as_bytes(data)
    h = _parse_header(mv)
    info = h.info
    layers = _check_range("layers", layers, info.L)
    chunks = _check_range("chunks", chunks, info.n_chunks)
    dtype = info.dtype if dtype is None else dtype
    if dtype not in DTYPES:
        raise TypeError(f"dtype: expected float32, float16 or bfloat16, got {dtype}")
    device = torch.device(device)
    C, ct = info.H * info.D, info.chunk_tokens
    t_start = chunks.start * ct
    t_stop = min(info.T, chunks.stop * ct)
    if device.type == "cuda" and info.coder == "rans":
        fast = _decode_flat_pages(data, info, dtype, device, layers, chunks, t_stop - t_start)
        if fast is not None:
            return fast
    out = torch.empty(2, len(layers), t_stop - t_start, C, dtype=dtype, device=device)
    recs: Dict[Tuple[int, int], list] = {}
    for c in chunks:
        d = _layer_dir(mv, h, c)
        for l in layers:
            recs[(c, l)] = _parse_record(mv, h, c, l, d[l], d[l + 1])
    co = _coder_mod()
    # group chunks of equal token count: full chunks and the (shorter) last one
    groups: Dict[int, List[int]] = {}
    for c in chunks:
        t0, t1 = _chunk_bounds(info.T, ct, c)
        groups.setdefault(t1 - t0, []).append(c)
    for k in range(2):
        spec = h.preset.kind(k)
        for li, l in enumerate(layers):
            bins = spec.bins[l]
            for N, cs in groups.items():
                S = len(cs)
                lens, pay, sides, freqs, exacts = [], [], [], [], []
                for c in cs:
                    side, freq, ln, p, ex = recs[(c, l)][k]
                    exacts.append(ex)
                    lens += ln
                    pay.append(p)
                    sides.append(side)
                    freqs.append(freq)
                offs = torch.zeros(len(lens) + 1, dtype=torch.int64)
                if lens:
                    offs[1:] = torch.tensor(lens, dtype=torch.int64).cumsum(0)
                payload = torch.frombuffer(bytearray(b"".join(pay)) or bytearray(1), dtype=torch.uint8)
                if info.table_mode == "chunk":
                    freq = torch.cat(freqs, 0)
                    tid = torch.arange(S * C, dtype=torch.int32).reshape(S, C)
                else:
                    freq = _tables_for(h.bank, k, l, C, bins, info.prob_bits)
                    tid = torch.arange(C, dtype=torch.int32).unsqueeze(0).expand(S, C).contiguous()
                side = {n: torch.stack([s[n] for s in sides]).to(device) for n in sides[0]}
                try:
                    if info.coder == "rans":
                        sym = co.rans_decode(payload.to(device), offs.to(device), freq.to(device), tid.to(device),
                                             N, info.prob_bits)
                    else:
                        sym = co.ac_decode(payload.to(device), offs.to(device),
                                           _tables.cdf_from_freq(freq).to(device), tid.to(device), N)
                except co.CoderError as e:
                    raise CodecError(f"layer {l}: coded streams malformed: {e}") from None
                if int(sym.max()) >= bins:
                    raise CodecError(f"layer {l}: decoded symbol outside the preset's bins")
                x = _presets.dequantize(sym, spec, l, side)  # [S, N, C] float32
                for i, c in enumerate(cs):
                    t0, t1 = _chunk_bounds(info.T, ct, c)
                    out[k, li, t0 - t_start:t1 - t_start] = x[i].to(dtype)
                    if exacts[i] is not None:  # post-pass: exact tokens overwrite their rows
                        e = exacts[i].shape[0]
                        out[k, li, t0 - t_start:t0 - t_start + e] = exacts[i].to(device=device, dtype=torch.float32).to(dtype)
    return out.reshape(2, len(layers), t_stop - t_start, info.H, info.D)
