"""Decode compressed KV straight into a serving engine's paged caches (docs/codec.md,
"Decode into pages").

* :func:`decode_into_pages` ``(data, layout, slot_mapping, *, layers=None, chunks=None, ...)``:
  a codec container (``kvkernels.codec.encode``'s bytes) into the caches of ALL its layers, K
  and V, in one kernel launch (rANS containers; ``ac`` containers decode, then scatter).
* :func:`rans_decode_pages`: the coder-level call (rANS blocks + the generic dequantization map
  + per-segment destinations), what a serving engine with its own framing would call.

rANS decode -> dequantize -> write through the :class:`~kvkernels.layouts.PagedLayout`
strides, no intermediate buffer (csrc/codec_dequant.cu); the torch reference
(``kvkernels.reference.codec.rans_decode_pages_into``) is the spec and the CPU path. Slots
follow vLLM's ``slot_mapping``: ``slot = block * block_size + offset``, ``< 0`` skips a token,
``>= num_blocks * block_size`` is out of range (skipped, never written, counted into
``oob_count``). Op: ``kvkernels::rans_decode_pages`` (mutates the caches and the status word,
fake for graphs).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from .. import dispatch
from .. import paged as _paged
from ..layouts import PagedLayout, PageTable
from ..reference import codec as _ref
from . import container as _ct
from . import presets as _presets
from .coders import CoderError, _check_map, _check_N, _check_rans_blocks, _tensor

dispatch.register("rans_decode_pages", "cuda", "kvkernels.cuda.codec_paged", "rans_decode_pages_into", "supports")
dispatch.register("rans_decode_pages", "torch", "kvkernels.reference.codec", "rans_decode_pages_into")


@torch.library.custom_op("kvkernels::rans_decode_pages", mutates_args=("caches", "status"))
def rans_decode_pages_op(payload: torch.Tensor, offsets: torch.Tensor, freq: torch.Tensor, table_id: torch.Tensor,
                         prob_bits: int, N: int, lut: torch.Tensor, lut_per_segment: bool,
                         s_tok: Optional[torch.Tensor], s_ch: Optional[torch.Tensor], z_ch: Optional[torch.Tensor],
                         segments: torch.Tensor, caches: List[torch.Tensor], ptrs: torch.Tensor, spec: List[int],
                         slots: torch.Tensor, k_scale: Optional[torch.Tensor], v_scale: Optional[torch.Tensor],
                         status: torch.Tensor, backend: Optional[str]) -> None:
    """rANS blocks -> the caches of ``spec`` / ``ptrs`` (``caches``: the tensors written through)."""
    lay = _paged._rebuild(spec, caches, ptrs)
    _, impl = dispatch.resolve("rans_decode_pages", (lay.device,), (lay,), backend, lay.device.type)
    cs = (k_scale, v_scale) if lay.fp8 else None
    impl(payload, offsets, freq, table_id, prob_bits, N, lut, lut_per_segment, s_tok, s_ch, z_ch, segments, lay,
         slots, cs, status)


@rans_decode_pages_op.register_fake
def _(payload, offsets, freq, table_id, prob_bits, N, lut, lut_per_segment, s_tok, s_ch, z_ch, segments, caches,
      ptrs, spec, slots, k_scale, v_scale, status, backend) -> None:
    return None


def _count_oob(oob_count, slots, layout):
    if oob_count is not None:  # on the device: no sync, graph-capturable
        oob_count.add_((slots >= layout.num_slots).sum().to(oob_count.dtype))


def rans_decode_pages(payload: torch.Tensor, offsets: torch.Tensor, freq: torch.Tensor, table_id: torch.Tensor,
                      N: int, prob_bits: int, lut: torch.Tensor, layout: PagedLayout, slot_mapping: torch.Tensor,
                      segments: torch.Tensor, s_tok: Optional[torch.Tensor] = None,
                      s_ch: Optional[torch.Tensor] = None, z_ch: Optional[torch.Tensor] = None, *,
                      lut_per_segment: bool = False, k_scale: Optional[torch.Tensor] = None,
                      v_scale: Optional[torch.Tensor] = None, oob_count: Optional[torch.Tensor] = None,
                      status: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> None:
    """rANS decode fused with dequantization, written into paged caches (one launch).

    Args:
        payload, offsets, freq, table_id, prob_bits: the rANS blocks as for
            :func:`kvkernels.codec.coders.rans_decode` (``table_id`` int32 ``[S, C]``, ``C`` must
            be the layout's ``num_heads * head_dim``: channel ``c`` is head ``c // head_dim``).
        N: tokens of the longest segment (``s_tok``'s second dim), >= 1.
        lut: float32 ``[K, bins]`` (row ``table_id[s, c]``) or, with ``lut_per_segment``,
            ``[S, bins]`` (row ``s``: one level row per segment, no shared-memory copy).
        layout: the caches (:class:`~kvkernels.layouts.PagedLayout`), written.
        slot_mapping: int32/int64 ``[T]`` on the caches' device (vLLM style).
        segments: int64 ``[S, 3]`` on the caches' device: row ``s = (r, t0, ns)``: segment ``s``
            holds ``ns <= N`` tokens, written to cache ``r`` (``kv * L + layer``: K of layers
            0..L-1, then V) at slots ``slot_mapping[t0 : t0 + ns]``. Device data, checked by
            the kernel: a row outside the caches or ``slot_mapping`` writes nothing.
        s_tok: optional float32 ``[S, N]``; s_ch, z_ch: optional float32 ``[S, C]`` (the map
            ``lut * s_tok * s_ch + z_ch`` in float32, no FMA, rounded once to the cache dtype).
        k_scale, v_scale: fp8 caches only (required there), as for :func:`kvkernels.scatter`:
            values are stored as ``e4m3(clamp(v * (1 / scale), +-448))``.
        oob_count: optional int32/int64 ``[1]`` device counter: adds the entries of
            ``slot_mapping`` that are ``>= num_blocks * block_size`` (skipped).
        status: optional int32 ``[1]``: receives the decode status (no sync, no raise);
            otherwise a malformed stream or descriptor raises :class:`CoderError` after the
            launch (blocks that fail are written as zeros at their slots).
        backend: ``"cuda"`` or ``"torch"`` (the reference; CPU caches).
    """
    layout = _paged._check_layout(layout)
    dev = layout.device
    _check_N(N)
    table_id = _tensor("table_id", table_id, torch.int32, 2, dev)
    S, C = table_id.shape
    if S < 1 or C != layout.num_heads * layout.head_dim:
        raise ValueError(f"table_id: expected [S >= 1, C = num_heads * head_dim = "
                         f"{layout.num_heads * layout.head_dim}], got {tuple(table_id.shape)}")
    table_id, freq, payload, offsets = _check_rans_blocks(payload, offsets, freq, table_id, prob_bits, dev)
    lut, aux = _check_map(lut, s_tok, s_ch, z_ch, S, N, C, freq, lut_per_segment, dev)
    segments = _tensor("segments", segments, torch.int64, 2, dev)
    if tuple(segments.shape) != (S, 3):
        raise ValueError(f"segments: expected int64 [S, 3] = {(S, 3)} rows (cache, first token, tokens), "
                         f"got {tuple(segments.shape)}")
    slots = _paged._check_slots(slot_mapping, None, layout, None, False).contiguous()
    ks, vs = _paged._check_scales(layout, k_scale, v_scale)
    cnt = _paged._check_counter(oob_count, layout)
    if status is not None:
        _tensor("status", status, torch.int32, 1, dev)
        if status.numel() != 1:
            raise ValueError(f"status: expected an int32 [1] tensor, got shape {tuple(status.shape)}")
    st = torch.zeros(1, dtype=torch.int32, device=dev)
    rans_decode_pages_op(payload, offsets, freq, table_id, prob_bits, N, lut, bool(lut_per_segment), *aux, segments,
                         layout.owners(), layout.ptrs, layout.spec(), slots, ks, vs, st, backend)
    _count_oob(cnt, slots, layout)
    if status is not None:
        status.copy_(st)
        return
    code = int(st.item())
    if code:
        raise CoderError(f"rans_decode_pages: {_ref.describe_status(code)} (status {code:#x})")


# ---- containers ------------------------------------------------------------------------------
def _cache_layers(layout: PagedLayout, info, layers: range) -> Tuple[int, str]:
    """Offset subtracted from a container layer to get its cache layer."""
    if layout.num_layers == info.L:
        return 0, "all"
    if layout.num_layers == len(layers):
        return layers.start, "decoded"
    raise ValueError(f"layout: has {layout.num_layers} layers; expected the container's {info.L} (cache layer = "
                     f"container layer) or the {len(layers)} decoded layers of {layers}")


def _check_geometry(layout: PagedLayout, info) -> None:
    if layout.num_kv != 2:
        raise ValueError("layout: a codec container holds K and V; a latent (MLA) layout cannot take it")
    if (layout.num_heads, layout.head_dim) != (info.H, info.D):
        raise ValueError(f"layout: has {layout.num_heads} heads x {layout.head_dim}, the container "
                         f"{info.H} x {info.D}")


def _sub_layout(layout: PagedLayout, layers: range, off: int) -> PagedLayout:
    """The caches of the decoded layers only (for the decode-then-scatter path)."""
    L = layout.num_layers
    if off == 0 and len(layers) == L:
        return layout
    ls = [l - off for l in layers]
    bases = [layout.bases[k * L + l] for k in range(layout.num_kv) for l in ls]
    return PagedLayout.from_strided(layout.engine, bases, len(ls), layout.num_kv, layout.num_blocks,
                                    layout.block_size, layout.num_heads, layout.head_dim, layout.strides,
                                    x=layout.x, fp8=layout.fp8)


def _kind_layout(layout: PagedLayout, k: int, layers: range, off: int) -> PagedLayout:
    """The caches of kind ``k`` (K 0, V 1) of the decoded layers only, as a one-kind layout."""
    L = layout.num_layers
    bases = [layout.bases[k * L + l - off] for l in layers]
    return PagedLayout.from_strided(layout.engine, bases, len(layers), 1, layout.num_blocks, layout.block_size,
                                    layout.num_heads, layout.head_dim, (layout.strides[k],), x=layout.x,
                                    fp8=layout.fp8)


def _write_exact(exact, layout: PagedLayout, slots: torch.Tensor, layers: range, off: int, k_scale, v_scale,
                 backend) -> None:
    """The exact tokens (raw rows stored beside the coded streams) over what the fused kernel
    wrote: one ``scatter`` a kind, of a small flat ``[1, L', E, H, D]`` float32 tensor with the
    matching slots (gathered on the device: no host sync; out-of-range slots skipped, not
    counted again)."""
    H, D, dev = layout.num_heads, layout.head_dim, layout.device
    for k, (idx, vals) in exact.items():
        sub = _kind_layout(layout, k, layers, off)
        kv = vals.to(dev, non_blocking=True).view(1, len(layers), -1, H, D)
        sl = slots.index_select(0, idx.to(dev, non_blocking=True))
        sc = None
        if layout.fp8:
            sc = _sub_scale(k_scale if k == 0 else v_scale, layers, off, layout.num_layers)
        _paged.scatter(kv, sub, sl, k_scale=sc, validate=False, backend=backend)


def _sub_scale(s, layers: range, off: int, L: int):
    if s is None or not isinstance(s, torch.Tensor) or s.dim() != 2 or s.shape[0] != L:
        return s
    return s[layers.start - off:layers.stop - off]


def decode_into_pages(data, layout: PagedLayout, slot_mapping: Optional[torch.Tensor] = None, *,
                      page_table: Optional[PageTable] = None, layers: Optional[range] = None,
                      chunks: Optional[range] = None, k_scale: Optional[torch.Tensor] = None,
                      v_scale: Optional[torch.Tensor] = None, oob_count: Optional[torch.Tensor] = None,
                      status: Optional[torch.Tensor] = None, backend: Optional[str] = None):
    """Decode a codec container straight into an engine's paged caches.

    Args:
        data: the container (``bytes``, ``bytearray``, ``memoryview`` or 1-D uint8 tensor),
            untrusted: parsed and checksummed on the host first (as :func:`kvkernels.codec.decode`).
        layout: the engine's caches (:class:`~kvkernels.layouts.PagedLayout`, K and V, the
            container's heads and head_dim, any dtype incl. fp8), written. Its layers are the
            container's (cache layer = container layer) or exactly the decoded ``layers``.
        slot_mapping: int32/int64 ``[T]`` on the caches' device, ``T >=`` the decoded tokens
            (token ``i`` of the decoded range goes to slot ``slot_mapping[i]``; extra entries
            are unused); or ``page_table`` (FlashInfer CSR, :class:`~kvkernels.PageTable`).
        layers, chunks: ``range``s of layers / chunks to decode (default all; only their bytes
            are read).
        k_scale, v_scale: fp8 caches only, as for :func:`kvkernels.scatter`.
        oob_count: optional device counter of out-of-range ``slot_mapping`` entries.
        status: optional int32 ``[1]`` (rANS): the kernel's status, no sync, no raise.
        backend: ``"cuda"`` or ``"torch"``.

    rANS containers: one launch for every (chunk, layer, K/V) segment (decode, dequantize, write;
    values bit-identical to ``decode(data, dtype=float32)`` rounded to the cache dtype, or
    fp8-encoded as ``scatter`` does). ``ac`` containers: ``decode`` on the caches' device, then
    :func:`kvkernels.scatter`.

    Returns: the container's :class:`~kvkernels.codec.ContainerInfo`.
    Raises: :class:`~kvkernels.codec.CodecError` for a malformed container; ValueError /
    TypeError naming the argument for bad arguments, before anything is written.
    """
    mv = _ct._as_bytes(data)
    h = _ct._parse_header(mv)
    info = h.info
    layout = _paged._check_layout(layout)
    _check_geometry(layout, info)
    layers = _ct._check_range("layers", layers, info.L)
    chunks = _ct._check_range("chunks", chunks, info.n_chunks)
    off, _ = _cache_layers(layout, info, layers)
    ct = info.chunk_tokens
    t_start, t_stop = chunks.start * ct, min(info.T, chunks.stop * ct)
    T = t_stop - t_start
    dev = layout.device
    if info.coder != "rans":
        sub = _sub_layout(layout, layers, off)
        kv = _ct.decode(data, dtype=torch.float32, device=dev, layers=layers, chunks=chunks)
        if slot_mapping is not None:
            _paged._check_slots(slot_mapping, None, layout, None, False)
            if slot_mapping.shape[0] < T:
                raise ValueError(f"slot_mapping: expected at least {T} entries (the decoded tokens), "
                                 f"got {slot_mapping.shape[0]}")
            slot_mapping = slot_mapping[:T]
        _paged.scatter(kv, sub, slot_mapping, page_table=page_table,
                       k_scale=_sub_scale(k_scale, layers, off, layout.num_layers),
                       v_scale=_sub_scale(v_scale, layers, off, layout.num_layers),
                       oob_count=oob_count, validate=False, backend=backend)
        return info
    slots = _paged._check_slots(slot_mapping, page_table, layout, T, False)
    if slots.shape[0] < T:
        raise ValueError(f"slot_mapping: expected at least {T} entries (the decoded tokens), got {slots.shape[0]}")
    if layout.fp8:  # checked before anything is written (the exact-token pass needs them too)
        _paged._check_scales(layout, k_scale, v_scale)
    args = _rans_arrays(mv, h, layers, chunks, off, layout.num_layers)
    N = args.pop("N")
    exact = args.pop("exact")
    to = {k: (v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    st = torch.zeros(1, dtype=torch.int32, device=dev) if status is None else status
    rans_decode_pages(to["payload"], to["offsets"], to["freq"], to["table_id"], N, info.prob_bits, to["lut"], layout,
                      slots, to["segments"], to["s_tok"], to["s_ch"], to["z_ch"], lut_per_segment=True,
                      k_scale=k_scale, v_scale=v_scale, oob_count=oob_count, status=st, backend=backend)
    if exact:  # same stream, after the fused kernel: the exact rows overwrite their slots
        _write_exact(exact, layout, slots, layers, off, k_scale, v_scale, backend)
    if status is None:
        code = int(st.item())
        if code:
            raise _ct.CodecError(f"coded streams malformed: {_ref.describe_status(code)} (status {code:#x})")
    return info


def _rans_arrays(mv, h, layers: range, chunks: range, off: int, Lc: int) -> Dict[str, object]:
    """The coder-level arrays of the chosen (chunk, layer, kind) segments, on the host:
    one payload, offsets, one freq bank (rows zero-padded to the widest layer's bins), per-segment
    level rows and the map's factors (absent ones as 1.0 / -0.0: exact identities); ``exact``:
    per kind with exact tokens, (int64 ``[E]`` their indices in the decoded range, float32
    ``[L', E, C]`` their raw rows)."""
    info = h.info
    C, ct = info.H * info.D, info.chunk_tokens
    t_start = chunks.start * ct
    bins_max = max(h.preset.kind(k).bins[l] for k in range(2) for l in layers)
    N = min(ct, info.T - t_start)
    pays: List[bytes] = []
    lens: List[int] = []
    freqs: List[torch.Tensor] = []
    tids: List[torch.Tensor] = []
    luts, stoks, schs, zchs, segs = [], [], [], [], []
    shared: Dict[Tuple[int, int], int] = {}
    nrows = 0
    use = {"s_tok": False, "s_ch": False, "z_ch": False}
    ex_idx: Dict[int, List[torch.Tensor]] = {}
    ex_rows: Dict[Tuple[int, int], List[torch.Tensor]] = {}
    for c in chunks:
        d = _ct._layer_dir(mv, h, c)
        t0, t1 = _ct._chunk_bounds(info.T, ct, c)
        ns = t1 - t0
        for l in layers:
            rec = _ct._parse_record(mv, h, c, l, d[l], d[l + 1])
            for k in range(2):
                spec = h.preset.kind(k)
                bins = spec.bins[l]
                side, freq, ln, p, ex = rec[k]
                if ex is not None:  # the chunk's first ex.shape[0] tokens, raw (KV dtype) [e, C]
                    if l == layers.start:
                        ex_idx.setdefault(k, []).append(torch.arange(ex.shape[0]) + (t0 - t_start))
                    ex_rows.setdefault((k, l), []).append(ex.float())
                if freq is None:  # shared bank rows, one block per (kind, layer)
                    if (k, l) not in shared:
                        f = _ct._tables_for(h.bank, k, l, C, bins, info.prob_bits)
                        freqs.append(torch.nn.functional.pad(f, (0, bins_max - bins)))
                        shared[(k, l)] = nrows
                        nrows += C
                    base = shared[(k, l)]
                else:
                    freqs.append(torch.nn.functional.pad(freq, (0, bins_max - bins)))
                    base = nrows
                    nrows += C
                tids.append(torch.arange(base, base + C, dtype=torch.int32))
                pays.append(p)
                lens += ln
                luts.append(_presets.lut_row(spec, l, bins_max))
                s_tok, s_ch, z_ch = _presets.dequant_params(spec, l, {n: v.unsqueeze(0) for n, v in side.items()})
                row = torch.ones(N, dtype=torch.float32)
                if s_tok is not None:
                    row[:ns] = s_tok[0]
                    use["s_tok"] = True
                stoks.append(row)
                schs.append(s_ch[0] if s_ch is not None else torch.ones(C))
                zchs.append(z_ch[0] if z_ch is not None else torch.full((C,), -0.0))
                use["s_ch"] |= s_ch is not None
                use["z_ch"] |= z_ch is not None
                segs.append((k * Lc + (l - off), t0 - t_start, ns))
    offs = torch.zeros(len(lens) + 1, dtype=torch.int64)
    offs[1:] = torch.tensor(lens, dtype=torch.int64).cumsum(0)
    exact = {k: (torch.cat(ix).to(torch.int64),
                 torch.stack([torch.cat(ex_rows[(k, l)], 0) for l in layers]).contiguous())
             for k, ix in ex_idx.items()}
    return dict(N=N, exact=exact, payload=torch.frombuffer(bytearray(b"".join(pays)) or bytearray(1), dtype=torch.uint8),
                offsets=offs, freq=torch.cat(freqs, 0).contiguous(), table_id=torch.stack(tids).contiguous(),
                lut=torch.stack(luts).contiguous(), segments=torch.tensor(segs, dtype=torch.int64),
                s_tok=torch.stack(stoks) if use["s_tok"] else None,
                s_ch=torch.stack(schs).float().contiguous() if use["s_ch"] else None,
                z_ch=torch.stack(zchs).float().contiguous() if use["z_ch"] else None)


__all__ = ["decode_into_pages", "rans_decode_pages", "rans_decode_pages_op"]
