"""Bench cases for the blend family: ``rerotate_keys``, the gather/scatter of selected tokens,
``select_tokens`` overhead, and time to first token (TTFT) of a blend vs full prefill.

Bytes moved (the floor): rerotate reads and writes the rotary channels of every key
(``2 * L*T*H*rot_dim * esize``) plus two cos/sin rows per token; gather/scatter of ``S`` selected
tokens of one layer's K and V reads and writes ``2 * 2 * S*H*D * esize``; select reads the fresh
and cached K and V (``4 * T*H*D * esize``). Each row has the same-run device copy of the same bytes.
TTFT rows (``op=ttft``): full prefill (one HF forward, SDPA causal) vs ``Blender.blend`` at 15%
on the same chunks (each prefilled alone beforehand, not timed), median of eager runs.
"""
from __future__ import annotations

import functools
import time

import torch

from kvkernels import dispatch
from kvkernels.blend import cos_sin_cache_from_inv_freq, rerotate_keys, select_tokens
from kvkernels.blend.ops import rerotate_keys_op, select_tokens_op
from kvkernels.reference import blend as ref

MODELS = {"llama3-8b": (32, 8, 128), "smollm2-135m": (30, 3, 64)}
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
                t = timer(functools.partial(rerotate_keys_op, k, old, new, cs, True, None, backend))
                rows.append(_row("rerotate_keys", backend, model, L, T, H, D, nb, t, copy, info,
                                 check="ok" if ok else "MISMATCH"))
                print(_fmt(rows[-1]), flush=True)
        # gather/scatter of 15% selected tokens of one layer (K and V, [T, H, D] each)
        S = max(1, int(0.15 * T))
        idx = torch.randperm(T, device=device)[:S].sort().values
        kc = torch.randn(T, H, D, device=device, dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        src_k, src_v = torch.randn(S, H, D, device=device, dtype=torch.bfloat16), torch.randn(S, H, D, device=device,
                                                                                                dtype=torch.bfloat16)
        nbs = 2 * 2 * S * H * D * 2

        def scatter():
            ref.scatter_tokens_(kc, idx, src_k)
            ref.scatter_tokens_(vc, idx, src_v)
        scatter()
        ok = torch.equal(kc[idx], src_k) and torch.equal(vc[idx], src_v)
        rows.append(_row("scatter_selected", "torch", model, 1, T, H, D, nbs, timer(scatter), copy, info, S=S,
                         check="ok" if ok else "MISMATCH"))
        print(_fmt(rows[-1]), flush=True)
        gk = torch.empty_like(src_k)
        gv = torch.empty_like(src_v)

        def gather():
            torch.index_select(kc, 0, idx, out=gk)
            torch.index_select(vc, 0, idx, out=gv)
        gather()
        ok = torch.equal(gk, kc[idx])
        rows.append(_row("gather_selected", "torch", model, 1, T, H, D, nbs, timer(gather), copy, info, S=S,
                         check="ok" if ok else "MISMATCH"))
        print(_fmt(rows[-1]), flush=True)
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


CASES = {"rerotate_keys": run, "select_tokens": run}
FAMILY = "blend"
