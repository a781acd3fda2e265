"""Bench cases for the blend family: ``rerotate_keys``, the gather/scatter of selected tokens,
``select_tokens`` overhead, and time to first token (TTFT) of a blend vs full prefill.

Bytes moved (the floor): rerotate reads and writes the rotary channels of every key
(``2 * L*T*H*rot_dim * esize``) plus two cos/sin rows per token (paged: plus the int64 slot
mapping; vLLM NHD caches of 16-token blocks in shuffled order); ``scatter_tokens`` of ``S = 15%``
selected tokens' recomputed K and V into one layer's ``[H, T, D]`` cache reads and writes
``2 * 2 * S*H*D * esize`` plus the index (``scatter_tokens_paged``: the same through
``kvkernels.scatter`` into a one-layer vLLM NHD layout); ``gather_tokens`` of their hidden states
``[T, hidden]`` and int64 positions reads and writes ``2 * S*hidden * esize + 2 * S*8`` plus the
index; select reads the fresh and cached K and V (``4 * T*H*D * esize``). Each row has the
same-run device copy of the same bytes.
TTFT rows (``op=ttft``): full prefill (one HF forward, SDPA causal) vs ``Blender.blend`` at 15%
on the same chunks (each prefilled alone beforehand, not timed), median of eager runs.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import torch

import kvkernels
from kvkernels import dispatch
from kvkernels.blend import cos_sin_cache_from_inv_freq, rerotate_keys_paged, select_tokens
from kvkernels.blend.ops import gather_tokens_op, rerotate_keys_op, scatter_tokens_op, select_tokens_op
from kvkernels.layouts import PagedLayout

MODELS = {"llama3-8b": (32, 8, 128), "smollm2-135m": (30, 3, 64)}
MODELS_HIDDEN = {"llama3-8b": 4096, "smollm2-135m": 576}
PAGE = 16  # block_size of the paged rows (vLLM's default)
GPU_SIZES = [("llama3-8b", 8192), ("llama3-8b", 32768), ("smollm2-135m", 8192)]
CPU_SIZES = [("smollm2-135m", 256)]
TTFT_GPU = [("llama3-8b", 4, 2048), ("llama3-8b", 8, 1024), ("llama3-8b", 4, 4096), ("smollm2-135m", 4, 2048)]
TTFT_CPU = [("smollm2-135m", 3, 64)]


def _row(op, backend, model, L, T, H, D, nbytes, t, copy, info, **kw):
    gbps = nbytes / t["median_us"] / 1e3
    c = copy.gbps(nbytes)
    return dict(op=op, format="bf16", backend=backend, model=model, L=L, T=T, H=H, D=D, bytes=nbytes, **t,
                GBps=gbps, copy_GBps=c, pct_copy=100 * gbps / c, status="ran", **kw, **info)


def run(args, timer, copy, info, op_names):
    device = args.device
    sizes = GPU_SIZES if device == "cuda" else CPU_SIZES
    if args.tokens:
        sizes = [(m, t) for m in {m for m, _ in sizes} for t in args.tokens]
    rows = []
    for model, T in sizes:
        L, H, D = MODELS[model]
        inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, dtype=torch.float64, device=device) / D))
        cs = cos_sin_cache_from_inv_freq(inv, 2 * T + 8)
        old = torch.arange(T, device=device)
        new = old + T // 2
        k0 = torch.randn(L, T, H, D, device=device, dtype=torch.bfloat16)
        want = k0.clone()
        rerotate_keys_op(want, old, new, cs, True, None, "torch")
        nb = 2 * k0.numel() * 2 + 2 * T * D * 4
        if "rerotate_keys" in op_names:
            for backend in args.backends:
                why = dispatch.refusal("rerotate_keys", backend, k0, cs, True, None)
                if why:
                    rows.append(dict(op="rerotate_keys", format="bf16", backend=backend, model=model, T=T,
                                     status=f"refused: {why}", **info))
                    continue
                k = k0.clone()
                rerotate_keys_op(k, old, new, cs, True, None, backend)
                ok = (k.float() - want.float()).abs().max().item() <= 2**-7 * want.float().abs().max().item()
                k = k0.clone()
                # rotating back and forth keeps the data bounded across reps (each call is one pass)
                t = timer(functools.partial(rerotate_keys_op, k, old, new, cs, True, None, backend),
                          graph=backend != "torch")
                rows.append(_row("rerotate_keys", backend, model, L, T, H, D, nb, t, copy, info,
                                 check="ok" if ok else "MISMATCH"))
                print(_fmt(rows[-1]), flush=True)
        if "rerotate_keys_paged" in op_names:
            rows += _paged_rows(args, timer, copy, info, model, L, T, H, D, cs, old, new, k0)
        # selected tokens (15%): scatter of their recomputed K/V into one layer's cache (HF's
        # [H, T, D] layout, K and V in one launch), gather of their hidden states and positions
        S = max(1, int(0.15 * T))
        idx = torch.randperm(T, device=device)[:S].sort().values
        kc = torch.randn(H, T, D, device=device, dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        src_k = torch.randn(H, S, D, device=device, dtype=torch.bfloat16)
        src_v = torch.randn_like(src_k)
        nbs = 2 * 2 * S * H * D * 2 + S * 8
        hidden = MODELS_HIDDEN[model]
        hs = torch.randn(T, hidden, device=device, dtype=torch.bfloat16)
        pos = torch.arange(T, device=device) + 7
        g_h = torch.empty(S, hidden, device=device, dtype=torch.bfloat16)
        g_p = torch.empty(S, device=device, dtype=torch.int64)
        nbg = 2 * S * hidden * 2 + 2 * S * 8 + S * 8
        for backend in args.backends:
            if backend == "cuda":
                continue  # Triton is the device kernel of these (a pure data move)
            for op, fn, nb in (
                    ("scatter_tokens", functools.partial(scatter_tokens_op, [kc.transpose(0, 1), vc.transpose(0, 1)], idx,
                                                         [src_k.transpose(0, 1), src_v.transpose(0, 1)], backend),
                     nbs),
                    ("gather_tokens", functools.partial(gather_tokens_op, [hs.view(T, 1, hidden), pos.view(T, 1, 1)],
                                                        idx, [g_h.view(S, 1, hidden), g_p.view(S, 1, 1)], backend),
                     nbg)):
                if op not in op_names:
                    continue
                case = ([src_k.transpose(0, 1)], [kc.transpose(0, 1)]) if op == "scatter_tokens" else ([hs.view(T, 1, hidden)], [g_h.view(S, 1, hidden)])
                why = dispatch.refusal(op, backend, *case)
                if why:
                    rows.append(dict(op=op, format="bf16", backend=backend, model=model, T=T, status=f"refused: {why}",
                                     **info))
                    continue
                fn()
                if op == "scatter_tokens":
                    ok = torch.equal(kc[:, idx], src_k) and torch.equal(vc[:, idx], src_v)
                else:
                    ok = torch.equal(g_h, hs[idx]) and torch.equal(g_p, pos[idx])
                rows.append(_row(op, backend, model, 1, T, H, D, nb, timer(fn), copy, info, S=S,
                                 check="ok" if ok else "MISMATCH"))
                print(_fmt(rows[-1]), flush=True)
        if "scatter_tokens" in op_names and device == "cuda":
            rows += _paged_scatter_rows(args, timer, copy, info, model, T, H, D, S, idx, src_k, src_v)
        kc = kc.transpose(0, 1)  # [T, H, D] views for the selection rows below
        vc = vc.transpose(0, 1)
        if "select_tokens" in op_names:
            fk, fv = torch.randn_like(kc), torch.randn_like(vc)
            want = select_tokens(fk, kc, fv, vc, count=S, backend="torch")
            mask = torch.empty(T, dtype=torch.bool, device=device)
            dev = torch.empty(T, dtype=torch.float32, device=device)
            for backend in args.backends:
                if backend == "cuda" or dispatch.refusal("select_tokens", backend, fk, kc, fv, vc):
                    continue
                fn = functools.partial(select_tokens_op, fk, kc, fv, vc, S, None, None, mask, dev, backend)
                fn()
                ok = torch.equal(mask, want.mask)
                rows.append(_row("select_tokens", backend, model, 1, T, H, D, 4 * kc.numel() * 2, timer(fn, graph=False),
                                 copy, info, S=S, check="ok" if ok else "MISMATCH"))
                print(_fmt(rows[-1]), flush=True)
        del k0, want, kc, vc
    if not getattr(args, "no_ttft", False):
        rows += ttft(args, info)
    return rows


def _paged_rows(args, timer, copy, info, model, L, T, H, D, cs, old, new, k0):
    """rerotate_keys_paged on vLLM NHD caches ([NB, 16, H, D] per layer, K and V), the T tokens
    in shuffled blocks: the same bytes as the flat rows, plus the slot mapping."""
    device = args.device
    rows = []
    NB = T // PAGE + 1
    kcs = [torch.zeros(NB, PAGE, H, D, device=device, dtype=torch.bfloat16) for _ in range(L)]
    blocks = torch.randperm(NB, device=device)[:(T + PAGE - 1) // PAGE]
    slots = (blocks[:, None] * PAGE + torch.arange(PAGE, device=device)[None]).flatten()[:T].contiguous()
    b, o = slots // PAGE, slots % PAGE
    for l in range(L):
        kcs[l][b, o] = k0[l]
    vcs = [torch.zeros(NB, PAGE, H, D, device=device, dtype=torch.bfloat16)] * L  # one V cache: V is not touched
    lay = PagedLayout.vllm_flash(kcs, vcs)
    want = k0.clone()
    rerotate_keys_op(want, old, new, cs, True, None, "torch")
    snap = [k.clone() for k in kcs]
    nb = 2 * k0.numel() * 2 + 2 * T * D * 4 + T * 8
    for backend in args.backends:
        if backend == "torch" and T > 8192:
            continue  # the reference's per-layer advanced indexing: minutes at 32K, nothing to learn
        kl = dataclasses.replace(lay, num_kv=1, strides=(lay.strides[0],), bases=tuple(lay.bases[:L]),
                                 ptrs=lay.ptrs[:L])
        why = dispatch.refusal("rerotate_keys_paged", backend, kl, slots, cs, True)
        if why:
            rows.append(dict(op="rerotate_keys_paged", format="bf16", backend=backend, model=model, T=T,
                             status=f"refused: {why}", **info))
            continue
        for k, s0 in zip(kcs, snap):
            k.copy_(s0)
        fn = functools.partial(rerotate_keys_paged, lay, slots, old, new, cs, backend=backend, validate=False)
        fn()
        got = torch.stack([kcs[l][b, o] for l in range(L)])
        exact = torch.equal(got, want)
        ok = (got.float() - want.float()).abs().max().item() <= 2**-7 * want.float().abs().max().item()
        # the reference's host work does not capture; a capture that raises leaves the CUDA
        # generator marked as capturing and the next random op fails: time it eagerly
        t = timer(fn, graph=backend != "torch")
        rows.append(_row("rerotate_keys_paged", backend, model, L, T, H, D, nb, t, copy, info, layout="vllm NHD bs16",
                         exact=exact, check="ok" if ok else "MISMATCH"))
        print(_fmt(rows[-1]), flush=True)
    del kcs, vcs, lay, snap
    return rows


def _paged_scatter_rows(args, timer, copy, info, model, T, H, D, S, idx, src_k, src_v):
    """The selected tokens' recomputed K/V into one layer of a paged cache: kvkernels.scatter
    (the paged family's op, all its backends) on a one-layer vLLM NHD layout, slots of the
    selected tokens."""
    device = args.device
    rows = []
    NB = T // PAGE + 1
    kc = torch.zeros(NB, PAGE, H, D, device=device, dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    lay = PagedLayout.vllm_flash([kc], [vc])
    blocks = torch.randperm(NB, device=device)[:(T + PAGE - 1) // PAGE]
    tok_slots = (blocks[:, None] * PAGE + torch.arange(PAGE, device=device)[None]).flatten()[:T]
    slots = tok_slots[idx].contiguous()
    kv = torch.stack([src_k.transpose(0, 1), src_v.transpose(0, 1)])[:, None]  # [2, 1, S, H, D]
    nb = 2 * 2 * S * H * D * 2 + S * 8
    for backend in args.backends:
        why = dispatch.refusal("scatter", backend, lay, kv, None, 0)
        if why:
            continue
        fn = functools.partial(kvkernels.scatter, kv, lay, slots, backend=backend)
        fn()
        ok = torch.equal(kc.view(-1, H, D)[slots], kv[0, 0]) and torch.equal(vc.view(-1, H, D)[slots], kv[1, 0])
        rows.append(_row("scatter_tokens_paged", backend, model, 1, T, H, D, nb, timer(fn), copy, info, S=S,
                         layout="vllm NHD bs16 (kvkernels.scatter)", check="ok" if ok else "MISMATCH"))
        print(_fmt(rows[-1]), flush=True)
    return rows


def _llama(model_name, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    if model_name == "llama3-8b":
        cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                          rope_theta=500000.0, attn_implementation="sdpa")
        dtype = torch.bfloat16
    else:
        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=16384,
                          rope_theta=100000.0, tie_word_embeddings=True, attn_implementation="sdpa")
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            m = LlamaForCausalLM(cfg)  # random weights: timing only
    finally:
        torch.set_default_dtype(prev)
    return m.eval()


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def ttft(args, info):
    from kvkernels.blend import Blender

    device = args.device
    rows = []
    cases = TTFT_GPU if device == "cuda" else TTFT_CPU
    built = {}
    reps = 5 if device == "cuda" else 2
    for model_name, n_chunks, n_tok in cases:
        if model_name not in built:
            built.clear()
            if device == "cuda":
                torch.cuda.empty_cache()
            built[model_name] = _llama(model_name, device)
        m = built[model_name]
        b = Blender(m)
        g = torch.Generator().manual_seed(0)
        chunk_ids = [torch.randint(0, m.config.vocab_size, (n_tok,), generator=g).to(device) for _ in range(n_chunks)]
        query = torch.randint(0, m.config.vocab_size, (32,), generator=g).to(device)
        chunks = [b.prefill(c) for c in chunk_ids]
        full = torch.cat(chunk_ids + [query])[None]

        def t_full():
            m(input_ids=full, use_cache=True, logits_to_keep=1)

        def t_blend():
            b.blend(chunks, query, ratio=0.15, first_k=16)

        res = {}
        for name, fn in (("full prefill", t_full), ("blend 15%", t_blend)):
            fn()
            _sync(device)
            ts = []
            for _ in range(reps):
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                ts.append((time.perf_counter() - t0) * 1e3)
            res[name] = sorted(ts)[len(ts) // 2]
        r = b.blend(chunks, query, ratio=0.15, first_k=16)
        row = dict(op="ttft", format="bf16" if device == "cuda" else "fp32", backend="auto", model=model_name,
                   chunks=n_chunks, chunk_tokens=n_tok, T=full.shape[1], full_ms=res["full prefill"],
                   blend_ms=res["blend 15%"], speedup=res["full prefill"] / res["blend 15%"],
                   recomputed_fraction=r.recomputed_fraction, status="ran", check="ok", **info)
        rows.append(row)
        print(f"ttft {model_name:12s} {n_chunks}x{n_tok:<5d} full {row['full_ms']:9.2f} ms  blend 15% "
              f"{row['blend_ms']:9.2f} ms  speedup {row['speedup']:5.2f}x  (recomputed {r.recomputed_fraction:.1%})",
              flush=True)
        del chunks, r
    return rows


def _fmt(r):
    return (f"{r['op']:16s} {r['backend']:6s} {r['model']:12s} T={r['T']:<6d} {r['bytes'] / 2**20:9.2f} MiB "
            f"{r['median_us']:10.1f} us {r['GBps']:8.1f} GB/s {r['pct_copy']:5.1f}% of copy  {r.get('check', '')}")


CASES = {"rerotate_keys": run, "rerotate_keys_paged": run, "gather_tokens": run, "scatter_tokens": run,
         "select_tokens": run}
FAMILY = "blend"
