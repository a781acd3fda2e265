"""Bench cases for the entropy coders (``ac_*``, ``rans_*``, fused ``rans_decode_dequant``).

Throughput is reported as GB/s of **bf16-equivalent KV**: 2 bytes per symbol (the uncompressed
side), so rows compare with a network / PCIe link delivering bf16 KV. ``bytes`` = 2 * symbols.
Shapes: Llama-3-8B (32 layers, 8 KV heads x 128 = C 1024 channels), K and V, 256-token chunks:
segments S = 2 * L * ceil(T / 256), tables per (kind, layer, channel) shared across chunks.
Symbols: Gaussian values quantized to 16 bins (32 in the first layers, as CacheGen).

Extra rows: ``decode_then_dequant`` (rans_decode + the dequantization map in torch, the unfused
baseline of ``rans_decode_dequant``), ``rans_decode_dequant_seglut`` (the fused decode with one
level row per segment, ``lut_per_segment=True``: what the container's presets store, levels per
(layer, kind); no level rows in shared memory) and, on the CPU, ``torchac`` encode/decode of the
same symbols (one stream with a per-symbol CDF, its native interface) when it imports, the decoders on
the C++ coder's portable path (``rans_decode:generic``, ``ac_decode:generic``) and ``x_torchac``
on every CPU coder row (its Msym/s over torchac's, same direction, same run).

Decode into pages (vLLM flash-attn NHD caches ``[2, NB, 16, H, D]`` bf16 per layer, tokens at a
random permutation of the slots), same run, same symbols: ``rans_decode_pages`` (one fused
launch: decode, dequantize, write every layer's K and V pages) against ``decode_then_scatter``
(``rans_decode_dequant_seglut`` into a flat ``[2, L, T, H, D]`` buffer, then ``kvkernels.scatter``);
the caches of both are compared byte for byte.
"""
from __future__ import annotations

import functools
import math

import torch

import kvkernels
from kvkernels import dispatch
from kvkernels.codec import coders
from kvkernels.codec import paged as cpaged
from kvkernels.layouts import PagedLayout
from kvkernels.reference import codec as R

MODELS = {"llama3-8b": (32, 8, 128)}
# (model, layers run, tokens): all 32 layers up to 4K tokens; 8 layers at 32K (the coders' work is
# per layer, so GB/s is that of the full model; it keeps the CPU reference check and the float32
# check tensors at ~0.5 G symbols)
GPU_SIZES = [("llama3-8b", 32, 1024), ("llama3-8b", 32, 4096), ("llama3-8b", 8, 32768)]
CPU_SIZES = [("llama3-8b", 2, 1024)]  # (model, layers run, tokens): one CPU core
CHUNK = 256
PB = 12


def make_case(L, T, H, D, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = H * D
    nch = math.ceil(T / CHUNK)
    N = min(T, CHUNK)
    S = 2 * L * nch
    bins_l = torch.tensor([32 if l < 2 else 16 for l in range(L)])
    bins = 32
    x = torch.randn(2, L, nch, N, C, generator=g) * 2.2
    half = (bins_l // 2).view(1, L, 1, 1, 1).float()
    sym = torch.minimum(torch.maximum((x.round() + half), torch.zeros(())), 2 * half - 1).to(torch.uint8)
    # tables per (kind, layer, channel): counts over the chunks, every symbol >= 1
    rows = sym.permute(0, 1, 4, 2, 3).reshape(2 * L * C, nch * N).long()
    counts = torch.zeros(2 * L * C, bins, dtype=torch.int64).scatter_add_(1, rows, torch.ones_like(rows))
    valid = torch.arange(bins).unsqueeze(0) < bins_l.repeat_interleave(C).repeat(2).unsqueeze(1)
    counts = torch.where(valid, counts, torch.zeros_like(counts))
    M = 1 << PB
    nb = valid.sum(1, keepdim=True)
    f = torch.floor(counts.double() * (M - nb) / counts.sum(1, keepdim=True)).long() + valid.long()
    f[torch.arange(f.shape[0]), counts.argmax(1)] += M - f.sum(1)
    freq = f.to(torch.int32)
    cdf = torch.zeros(freq.shape[0], bins + 1, dtype=torch.int32)
    cdf[:, 1:] = (torch.cumsum(f, 1) << (16 - PB)).to(torch.int32)
    tid = (torch.arange(2 * L).view(2 * L, 1, 1) * C + torch.arange(C).view(1, 1, C)).expand(2 * L, nch, C)
    tid = tid.reshape(S, C).to(torch.int32).contiguous()
    sym = sym.reshape(S, N, C).contiguous()
    lut = (torch.arange(bins).float() - bins_l.repeat_interleave(C).repeat(2).unsqueeze(1).float() / 2)
    s_tok = torch.rand(S, N, generator=g) + 0.5
    dev = lambda t: t.to(device)  # noqa: E731
    lut_seg = lut[tid[:, 0].long()].contiguous()  # every channel of a segment has its layer's levels
    return dict(sym=dev(sym), freq=dev(freq), cdf=dev(cdf), tid=dev(tid), lut=dev(lut.contiguous()),
                lut_seg=dev(lut_seg), s_tok=dev(s_tok), S=S, N=N, C=C, L=L, T=T, H=H, D=D, nch=nch)


def run(args, timer, copy, info, op_names):
    device = args.device
    sizes = GPU_SIZES if device == "cuda" else CPU_SIZES
    if args.tokens:
        sizes = [(m, l, t) for m, l, _ in sizes[:1] for t in args.tokens]
    rows = []
    for model, L, T in sizes:
        _, H, D = MODELS[model]
        c = make_case(L, T, H, D, device)
        S, N, C = c["S"], c["N"], c["C"]
        nsym = S * N * C
        nbytes = 2 * nsym
        base = dict(model=model, L=L, T=T, H=H, D=D, dtype="bfloat16", bytes=nbytes, **info)
        # reference encodings (torch backend: the C++ CPU coder when built)
        pl_r, off_r = coders.rans_encode(c["sym"].cpu(), c["freq"].cpu(), c["tid"].cpu(), PB, backend="torch")
        pl_a, off_a = coders.ac_encode(c["sym"].cpu(), c["cdf"].cpu(), c["tid"].cpu(), backend="torch")
        bits = {"rans": 8 * pl_r.numel() / nsym, "ac": 8 * pl_a.numel() / nsym}
        pl_r, off_r, pl_a, off_a = (t.to(device) for t in (pl_r, off_r, pl_a, off_a))
        want_dq = R.dequant_spec(c["sym"].cpu(), c["tid"].cpu(), c["lut"].cpu(), c["s_tok"].cpu(), None, None)
        want_dq = want_dq.to(torch.bfloat16)
        st = torch.zeros(1, dtype=torch.int32, device=device)
        for backend in args.backends:
            pages = _Pages(c, device, want_dq)
            for op in ("ac_encode", "ac_decode", "rans_encode", "rans_decode", "rans_decode_dequant",
                       "decode_then_dequant", "rans_decode_dequant_seglut", "rans_decode_pages",
                       "decode_then_scatter"):
                coder = "ac" if op.startswith("ac") else "rans"
                row = dict(op=op, format=f"{coder}:{bits[coder]:.3f}bits", backend=backend, **base)
                reg = {"decode_then_dequant": "rans_decode", "rans_decode_dequant_seglut": "rans_decode_dequant",
                       "decode_then_scatter": "rans_decode_dequant"}.get(op, op)
                if op in ("rans_decode_pages", "decode_then_scatter"):
                    why = dispatch.refusal(op if op == "rans_decode_pages" else reg, backend,
                                           pages.layout if op == "rans_decode_pages" else c["sym"])
                    if why:
                        rows.append({**row, "status": f"refused: {why}"})
                        continue
                    fn, check = pages.case(op, backend, st, pl_r, off_r)
                    st.zero_()
                    fn()
                    ok = check() and int(st.item()) == 0
                    t = timer(fn)
                    rows.append({**row, **t, "GBps": nbytes / t["median_us"] / 1e3, "Msym_s": nsym / t["median_us"],
                                 "bits_per_symbol": bits[coder], "check": "ok" if ok else "MISMATCH",
                                 "status": "ran"})
                    print(_fmt_row(rows[-1]), flush=True)
                    continue
                why = dispatch.refusal(reg, backend, c["sym"])
                if why:
                    rows.append({**row, "status": f"refused: {why}"})
                    continue
                fn, check = _case_fn(op, c, backend, st, pl_r, off_r, pl_a, off_a, want_dq)
                st.zero_()
                fn()
                ok = check() and int(st.item()) == 0
                t = timer(fn)
                gbps = nbytes / t["median_us"] / 1e3
                rows.append({**row, **t, "GBps": gbps, "Msym_s": nsym / t["median_us"],
                             "bits_per_symbol": bits[coder], "check": "ok" if ok else "MISMATCH", "status": "ran"})
                print(_fmt_row(rows[-1]), flush=True)
        if device == "cpu":
            rows += _cpu_generic_rows(c, base, timer, st, pl_r, off_r, pl_a, off_a, bits)
            peer = _torchac_rows(c, base)
            rows += peer
            _add_torchac_ratio(rows, peer, base)
        del c, pages
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _case_fn(op, c, backend, st, pl_r, off_r, pl_a, off_a, want_dq):
    S, N, C, dev = c["S"], c["N"], c["C"], c["sym"].device
    sym, freq, cdf, tid = c["sym"], c["freq"], c["cdf"], c["tid"]
    if op == "ac_encode":
        out = torch.empty(S * C * R.ac_stream_capacity(N), dtype=torch.uint8, device=dev)
        off = torch.empty(S * C + 1, dtype=torch.int64, device=dev)
        fn = functools.partial(coders.ac_encode_op, sym, cdf, tid, out, off, st, backend)
        return fn, lambda: torch.equal(off, off_a) and torch.equal(out[:pl_a.numel()], pl_a)
    if op == "rans_encode":
        out = torch.empty(S * R.rans_block_capacity(N, C), dtype=torch.uint8, device=dev)
        off = torch.empty(S * R.n_groups(C) + 1, dtype=torch.int64, device=dev)
        fn = functools.partial(coders.rans_encode_op, sym, freq, tid, PB, out, off, st, backend)
        return fn, lambda: torch.equal(off, off_r) and torch.equal(out[:pl_r.numel()], pl_r)
    out = torch.empty_like(sym)
    if op == "ac_decode":
        return (functools.partial(coders.ac_decode_op, pl_a, off_a, cdf, tid, out, st, backend),
                lambda: torch.equal(out, sym))
    if op == "rans_decode":
        return (functools.partial(coders.rans_decode_op, pl_r, off_r, freq, tid, PB, out, st, backend),
                lambda: torch.equal(out, sym))
    y = torch.empty((S, N, C), dtype=torch.bfloat16, device=dev)
    if op == "rans_decode_dequant":
        return (functools.partial(coders.rans_decode_dequant_op, pl_r, off_r, freq, tid, PB, c["lut"], c["s_tok"],
                                  None, None, y, st, backend),
                lambda: torch.equal(y.cpu(), want_dq))
    if op == "rans_decode_dequant_seglut":
        return (functools.partial(coders.rans_decode_dequant_op, pl_r, off_r, freq, tid, PB, c["lut_seg"],
                                  c["s_tok"], None, None, y, st, backend, True),
                lambda: torch.equal(y.cpu(), want_dq))
    idx = tid.long().unsqueeze(1)

    def unfused():  # decode, then the map in torch (the symbol buffer round trip)
        coders.rans_decode_op(pl_r, off_r, freq, tid, PB, out, st, backend)
        v = c["lut"][idx, out.long()] * c["s_tok"].unsqueeze(2)
        y.copy_(v)
    return unfused, lambda: torch.equal(y.cpu(), want_dq)


class _Pages:
    """The decode-into-pages rows: vLLM NHD bf16 caches of the case's layers, block size 16,
    token t of every (kind, layer) at slot perm[t]; segment s = (kind * L + layer) * nch + chunk."""

    BS = 16

    def __init__(self, c, device, want):
        L, H, D, N, nch, S = c["L"], c["H"], c["D"], c["N"], c["nch"], c["S"]
        T = nch * N
        NB = (T + self.BS - 1) // self.BS
        g = torch.Generator().manual_seed(1)
        self.slots = torch.randperm(NB * self.BS, generator=g)[:T].to(device)
        mk = lambda: [torch.zeros(2, NB, self.BS, H, D, dtype=torch.bfloat16, device=device)  # noqa: E731
                      for _ in range(L)]
        self.caches, self.caches2 = mk(), mk()
        self.layout = PagedLayout.vllm_flash(self.caches, kv_dim=0)
        self.layout2 = PagedLayout.vllm_flash(self.caches2, kv_dim=0)
        s = torch.arange(S)
        self.segments = torch.stack([s // nch, (s % nch) * N, torch.full_like(s, N)], 1).to(device)
        self.flat = torch.empty(2, L, T, H, D, dtype=torch.bfloat16, device=device)
        self.c, self.T, self.want = c, T, want

    def case(self, op, backend, st, pl_r, off_r):
        c, lay = self.c, self.layout
        if op == "rans_decode_pages":
            fn = functools.partial(cpaged.rans_decode_pages_op, pl_r, off_r, c["freq"], c["tid"], PB, c["N"],
                                   c["lut_seg"], True, c["s_tok"], None, None, self.segments, lay.owners(), lay.ptrs,
                                   lay.spec(), self.slots, None, None, st, backend)
            return fn, lambda: self._check(self.layout)
        y = self.flat.view(c["S"], c["N"], c["C"])

        def unfused():  # the fused dense decode into a flat buffer, then the paged scatter
            coders.rans_decode_dequant_op(pl_r, off_r, c["freq"], c["tid"], PB, c["lut_seg"], c["s_tok"], None, None,
                                          y, st, backend, True)
            kvkernels.scatter(self.flat, self.layout2, self.slots, validate=False, backend=backend)
        return unfused, lambda: self._check(self.layout2)

    def _check(self, layout):
        """The caches hold the fused map's values at the slots (read back with ``gather``)."""
        back = kvkernels.gather(layout, self.slots)
        return torch.equal(back.view(self.c["S"], self.c["N"], self.c["C"]).cpu(), self.want)


def _cpu_generic_rows(c, base, timer, st, pl_r, off_r, pl_a, off_a, bits):
    """CPU only: the decoders on the C++ coder's portable path (``KVK_CODEC_CPU_ISA=generic``, the
    baseline of its AVX-512 / SSE2 fast paths), ops ``rans_decode:generic``, ``ac_decode:generic``."""
    import os

    if not R.cpu_coder_available():
        return []
    out = []
    old = os.environ.get("KVK_CODEC_CPU_ISA")
    os.environ["KVK_CODEC_CPU_ISA"] = "generic"
    try:
        for op in ("rans_decode", "ac_decode"):
            coder = op.split("_")[0]
            fn, check = _case_fn(op, c, "torch", st, pl_r, off_r, pl_a, off_a, None)
            st.zero_()
            fn()
            ok = check() and int(st.item()) == 0
            t = timer(fn)
            nsym = c["sym"].numel()
            out.append({**base, "op": f"{op}:generic", "format": f"{coder}:{bits[coder]:.3f}bits", "backend": "torch",
                        **t, "GBps": 2 * nsym / t["median_us"] / 1e3, "Msym_s": nsym / t["median_us"],
                        "bits_per_symbol": bits[coder], "check": "ok" if ok else "MISMATCH", "status": "ran"})
            print(_fmt_row(out[-1]), flush=True)
    finally:
        if old is None:
            os.environ.pop("KVK_CODEC_CPU_ISA", None)
        else:
            os.environ["KVK_CODEC_CPU_ISA"] = old
    return out


def _add_torchac_ratio(rows, peer, base):
    """CPU rows of this size get ``x_torchac``: Msym/s over torchac's of the same direction, timed in
    the same run (a rough figure on a shared machine; scripts/codec_cpu_ratio.py alternates the two
    and reports the median ratio)."""
    ref = {r["op"]: r.get("Msym_s") for r in peer if r.get("status") == "ran"}
    for r in rows:
        if r.get("status") != "ran" or r.get("backend") != "torch" or r.get("T") != base["T"] or r.get("L") != base["L"]:
            continue
        peer_op = "torchac_encode" if r["op"].split(":")[0].endswith("encode") else "torchac_decode"
        if ref.get(peer_op):
            r["x_torchac"] = r["Msym_s"] / ref[peer_op]
            print(f"{r['op']:20s} {r['backend']:8s} x torchac ({peer_op}): {r['x_torchac']:.1f}", flush=True)


def _torchac_rows(c, base):
    try:
        import time

        import torchac  # test/bench-only peer (GPL), never imported by the package
    except Exception as e:  # noqa: BLE001
        return [{**base, "op": "torchac", "backend": "torchac", "status": f"refused: cannot import ({e})"}]
    n = min(c["sym"].numel(), 1 << 20)
    S, N, C = c["S"], c["N"], c["C"]
    # the first n symbols in stream order (s, c, n) with each one's CDF row (int16, torchac's form)
    sym = c["sym"].permute(0, 2, 1).reshape(-1)[:n]
    rows = c["tid"].reshape(S, C, 1).expand(S, C, N).reshape(-1)[:n].long()
    cdf = c["cdf"][rows]
    cdf16 = torch.where(cdf > 32767, cdf - 65536, cdf).to(torch.int16)
    s16 = sym.to(torch.int16)
    out = []
    data = torchac.encode_int16_normalized_cdf(cdf16, s16)
    for op, fn in (("torchac_encode", lambda: torchac.encode_int16_normalized_cdf(cdf16, s16)),
                   ("torchac_decode", lambda: torchac.decode_int16_normalized_cdf(cdf16, data))):
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            r = fn()
            ts.append((time.perf_counter() - t0) * 1e6)
        ok = op == "torchac_encode" or torch.equal(r.to(torch.uint8), sym)
        us = sorted(ts)[1]
        out.append({**base, "op": op, "format": f"ac:{8 * len(data) / n:.3f}bits", "backend": "torchac",
                    "bytes": 2 * n, "median_us": us, "GBps": 2 * n / us / 1e3, "Msym_s": n / us,
                    "check": "ok" if ok else "MISMATCH", "status": "ran"})
        print(_fmt_row(out[-1]), flush=True)
    return out


def _fmt_row(r):
    return (f"{r['op']:20s} {r['backend']:8s} {r['model']:10s} L={r['L']:<3d} T={r['T']:<6d} {r['format']:16s} "
            f"{r['bytes'] / 2**20:9.1f} MiB-bf16 {r['median_us']:12.1f} us {r['GBps']:8.3f} GB/s "
            f"{r['Msym_s']:9.1f} Msym/s  {r['check']}")


CASES = {op: run for op in ("ac_encode", "ac_decode", "rans_encode", "rans_decode", "rans_decode_dequant",
                            "rans_decode_pages")}
FAMILY = "codec"
