"""Bench cases for paged ``scatter`` / ``gather`` (all layers per call).

Caches: vLLM flash-attn layout, per layer ``[2, NB, BS, H, D]`` (bf16, or fp8 e4m3 with per-head
scales); tokens on random pages (a random permutation of blocks, tokens in order inside a block).
Bytes moved (the floor), per call over all layers and K/V (n = 2 * L * T * H * D elements):

* scatter ``bf16``: reads n * 2 (flat) + T * 8 (slots), writes n * 2 (cache);
  ``fp8cache``: reads n * 2, writes n (e4m3 cache); ``<format>`` (fused dequantize of a
  QuantizedKV into a bf16 cache): reads the codes + scales (+ zeros), writes n * 2.
* gather ``bf16``: reads n * 2 (cache) + slots, writes n * 2; ``fp8cache``: reads n, writes n * 2;
  ``<format>`` (fused quantize): reads n * 2, writes codes + scales (+ zeros).
* ``host-copy`` / ``host-kernel``: the flat side in pinned host memory (PCIe traffic counted:
  the flat bytes); the ratio is to a pinned ``cudaMemcpyAsync`` of the same bytes in the same run
  (``copy_GBps`` column), not to the device copy.

Backends per row: ``cuda``, ``triton`` (one launch for all layers), ``torch`` (the reference),
and the baselines a user would write, measured in the same run: ``torch-loop`` (a per-layer loop
of ``index_copy_`` / ``index_select``) and ``<backend>-per-layer`` (one launch per layer of the
same kernel). Every row is checked against the reference result before timing; small calls (16
tokens) are timed under CUDA-graph replay (the harness times graph replays whenever the call can
be captured; the torch reference cannot and is timed eagerly, without a capture attempt).

Memory: the reference result is computed once per case in chunks of layers (``_ref_chunks``)
and kept on the host, so that a check needs no second full-size cache or output on the GPU;
each row's callable, outputs and CUDA graph are freed (``gc.collect``, ``empty_cache``) before
the next row, so that T=32768 on the 70B shape (80 layers: 10 GiB of bf16 flat KV and as much
cache) fits in ~75 GiB beside the copy baseline. The torch reference is not timed above
``REFERENCE_MAX_ELEMS`` flat elements (the row says so).

Quick run: ``KVK_BENCH_QUICK=1 python -m bench paged`` runs one size, Llama-3-8B T=4096 block 16
(or the ``--tokens`` given, still one model and block size), every format x backend.
``KVK_BENCH_MODELS=llama3-70b`` (a comma list) keeps the sizes of those models only, so that a
full run can be split over calls. With ``--out``, ``paged.json`` is rewritten after every case
(op x format), so a run cut off by a time bound keeps the rows it finished.
"""
from __future__ import annotations

import gc
import json
import math
import os

import torch

import kvkernels
from kvkernels import PagedLayout, dispatch
from kvkernels.formats import QuantFormat

# (model, L, H, D); T varies
MODELS = {"llama3-8b": (32, 8, 128), "llama3-70b": (80, 8, 128), "smollm2-135m": (30, 3, 64)}
GPU_SIZES = [("llama3-8b", 16), ("llama3-8b", 1024), ("llama3-8b", 4096), ("llama3-8b", 32768),
             ("llama3-70b", 16), ("llama3-70b", 4096), ("llama3-70b", 32768)]
CPU_SIZES = [("smollm2-135m", 16)]
BLOCK_SIZES = (16, 32)
SCATTER_VARIANTS = ["bf16", "fp8cache", "int8:g64:channel", "int4:g32:channel", "fp8:token_head", "host-copy",
                    "host-kernel"]
GATHER_VARIANTS = ["bf16", "fp8cache", "int8:g64:channel", "fp8:token_head", "host-copy", "host-kernel"]
REFERENCE_MAX_ELEMS = 2**31  # the torch reference row only up to this many flat elements
CHUNK_ELEMS = 2**28  # reference check: layers per chunk so that a chunk has at most this many elements
QUICK = os.environ.get("KVK_BENCH_QUICK", "") not in ("", "0")
ONLY_MODELS = [m for m in os.environ.get("KVK_BENCH_MODELS", "").split(",") if m]


def _slots(T, NB, BS, device):
    pages = torch.randperm(NB, device=device)[: -(-T // BS)]
    t = torch.arange(T, device=device)
    return (pages[t // BS] * BS + t % BS).to(torch.int64)


def _caches(L, NB, BS, H, D, fp8, device):
    dt = torch.float8_e4m3fn if fp8 else torch.bfloat16
    return [torch.zeros(2, NB, BS, H, D, dtype=dt, device=device) for _ in range(L)]


def _fmt_bytes(fmt: QuantFormat, R, T, H, D):
    meta = math.prod(fmt.scale_shape(R, T, H, D)) * 4 * (2 if fmt.has_zero else 1)
    return R * T * H * D * fmt.bits // 8 + meta


def run(args, timer, copy, info, op_names):
    device = args.device
    sizes = GPU_SIZES if device == "cuda" else CPU_SIZES
    block_sizes = BLOCK_SIZES
    if QUICK:
        sizes, block_sizes = [(sizes[0][0], 4096 if device == "cuda" else sizes[0][1])], BLOCK_SIZES[:1]
    if args.tokens:
        models = list(dict.fromkeys(m for m, _ in sizes))
        sizes = [(m, t) for m in models for t in args.tokens]
    if ONLY_MODELS:
        unknown = sorted(set(ONLY_MODELS) - set(MODELS))
        if unknown:
            raise ValueError(f"KVK_BENCH_MODELS: unknown models {unknown}; expected some of {sorted(MODELS)}")
        sizes = [(m, t) for m, t in sizes if m in ONLY_MODELS]
    rows = []
    pinned_rate = {}

    def pinned_gbps(nbytes):
        if nbytes not in pinned_rate:
            h = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
            d = torch.empty(nbytes, dtype=torch.uint8, device=device)
            t = timer(lambda: d.copy_(h, non_blocking=True), graph=False)["median_us"]
            pinned_rate[nbytes] = nbytes / t / 1e3
            del h, d
            _free()
        return pinned_rate[nbytes]

    for model, T in sizes:
        L, H, D = MODELS[model]
        n = 2 * L * T * H * D
        for BS in block_sizes:
            NB = -(-T // BS) + 8
            slots = _slots(T, NB, BS, device)
            kv = (torch.randn(2, L, T, H, D, device=device) * 2).to(torch.bfloat16)
            scale = {"k_scale": torch.rand(H, device=device) * 0.02 + 0.005,
                     "v_scale": torch.rand(H, device=device) * 0.02 + 0.005}
            for op in op_names:
                variants = GATHER_VARIANTS if op == "gather" else SCATTER_VARIANTS
                if args.formats:
                    variants = [v for v in variants if v in args.formats]
                for var in variants:
                    if var.startswith("host") and device != "cuda":
                        continue
                    rows += _run_variant(args, timer, copy, info, op, var, model, kv, slots, scale, L, T, H, D,
                                         NB, BS, n, pinned_gbps)
                    _free()
                    _dump_partial(args, rows)
            del kv, slots, scale
            _free()
    return rows


def _dump_partial(args, rows):
    """Rewrite <out>/paged.json with the rows so far (the CLI writes the final one)."""
    if getattr(args, "out", None):
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"{FAMILY}.json"), "w") as f:
            json.dump(rows, f, indent=1)


def _run_variant(args, timer, copy, info, op, var, model, kv, slots, scale, L, T, H, D, NB, BS, n, pinned_gbps):
    """The rows of one (op, variant) case: every backend, each checked, timed, then freed."""
    device = args.device
    rows = []
    host = var.startswith("host")
    fp8 = var == "fp8cache"
    fmt = None if var in ("bf16", "fp8cache") or host else QuantFormat.parse(var)
    sc = scale if fp8 else {}
    caches = _caches(L, NB, BS, H, D, fp8, device)
    lay = PagedLayout.vllm_flash(caches, kv_dim=0)
    q = kvkernels.quantize(kv.flatten(0, 1), fmt) if (fmt is not None and op == "scatter") else None
    src = q if q is not None else kv
    if op == "gather":  # fill the caches once (the reference scatter, layer by layer)
        kvkernels.scatter(kv, lay, slots, backend="torch", **sc)
    ref = _ref_chunks(op, src, fmt, slots, sc, caches, L, NB, BS, H, D, fp8, device)
    if op == "scatter":
        rd = (_fmt_bytes(fmt, 2 * L, T, H, D) if fmt else n * 2) + T * 8
        wr = n if fp8 else n * 2
    else:
        rd = (n if fp8 else n * 2) + T * 8
        wr = _fmt_bytes(fmt, 2 * L, T, H, D) if fmt else n * 2
    nbytes = rd + wr
    hkv = kv.cpu().pin_memory() if host else None
    hout = torch.empty(kv.shape, dtype=kv.dtype).pin_memory() if (host and op == "gather") else None
    backends = list(args.backends)
    if not host:
        backends += ["torch-loop"] + [f"{b}-per-layer" for b in args.backends if b in ("cuda", "triton")]
    for backend in backends:
        row = dict(op=op, format=var, backend=backend, model=f"{model} bs{BS}", L=L, T=T, H=H, D=D,
                   block_size=BS, dtype="bfloat16", bytes=(n * 2 if host else nbytes), **info)
        fn, why = _make_fn(op, backend, var, lay, caches, src, fmt, slots, sc, hkv, hout, L, NB, BS, H, D, n)
        if why:
            rows.append({**row, "status": f"refused: {why}"})
            continue
        if op == "scatter":
            for c in caches:
                c.zero_()
        try:
            res = fn()  # reference check before timing
            if host and op == "gather":
                torch.cuda.synchronize()
                res = hout
            ok = _check(op, ref, res, caches, fmt, L, T, H, D)
            del res
            # the torch reference cannot be captured (host syncs): timed eagerly, no capture
            # attempt (a failed capture can keep its graph's memory pool)
            t = timer(fn, graph=backend != "torch")
        except torch.OutOfMemoryError:  # a baseline too big beside the case's tensors: say so
            res = fn = None
            _free()
            rows.append({**row, "status": "refused: out of GPU memory beside this case's tensors"})
            continue
        del fn
        _free()
        gbps = row["bytes"] / t["median_us"] / 1e3
        cg = pinned_gbps(n * 2) if host else copy.gbps(nbytes)
        rows.append({**row, **t, "GBps": gbps, "copy_GBps": cg, "pct_copy": 100 * gbps / cg,
                     "baseline": "pinned cudaMemcpyAsync" if host else "device copy",
                     "check": "ok" if ok else "MISMATCH", "status": "ran"})
        print(_fmt_row(rows[-1]), flush=True)
    del caches, lay, q, src, ref, hkv, hout
    return rows


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _layer_chunks(L, T, H, D):
    n = max(1, CHUNK_ELEMS // max(1, 2 * T * H * D))
    return [(l0, min(L, l0 + n)) for l0 in range(0, L, n)]


def _rows(x, L, l0, l1):
    """Rows of K layers l0..l1 then V layers l0..l1 of a [2 * L, ...] tensor."""
    return torch.cat([x[l0:l1], x[L + l0:L + l1]]) if x is not None else None


def _q_rows(q, L, l0, l1):
    return kvkernels.QuantizedKV(codes=_rows(q.codes, L, l0, l1), scale=_rows(q.scale, L, l0, l1),
                                 zero=_rows(q.zero, L, l0, l1), format=q.format, dtype=q.dtype, head_dim=q.head_dim)


def _ref_chunks(op, src, fmt, slots, sc, caches, L, NB, BS, H, D, fp8, device):
    """The reference result, by chunks of layers, on the host: scatter -> per chunk the list of
    its caches' bytes; gather -> per chunk the flat [2, l1-l0, T, H, D] or (codes, scale)."""
    out = []
    T = slots.shape[0]
    for l0, l1 in _layer_chunks(L, T, H, D):
        if op == "scatter":
            ref = _caches(l1 - l0, NB, BS, H, D, fp8, device)
            s = _q_rows(src, L, l0, l1) if fmt is not None else src[:, l0:l1]
            kvkernels.scatter(s, PagedLayout.vllm_flash(ref, kv_dim=0), slots, backend="torch", **sc)
            out.append([c.view(torch.uint8).cpu() for c in ref])
            del ref, s
        else:
            lay = PagedLayout.vllm_flash(caches[l0:l1], kv_dim=0)
            g = kvkernels.gather(lay, slots, format=fmt, backend="torch", **sc)
            out.append((g.codes.view(torch.uint8).cpu(), g.scale.cpu()) if fmt is not None else g.cpu())
            del lay, g
        _free()
    return out


def _check(op, ref, res, caches, fmt, L, T, H, D):
    """Whether a backend's result equals the host-held reference, chunk by chunk on the GPU."""
    for (l0, l1), want in zip(_layer_chunks(L, T, H, D), ref):
        if op == "scatter":
            if not all(torch.equal(c.view(torch.uint8), w.to(c.device)) for c, w in zip(caches[l0:l1], want)):
                return False
        elif fmt is not None:
            codes, scale = want
            dev = res.codes.device
            if not (torch.equal(_rows(res.codes.view(torch.uint8), L, l0, l1), codes.to(dev))
                    and torch.equal(_rows(res.scale, L, l0, l1), scale.to(dev))):
                return False
        else:
            got = res[:, l0:l1]
            if not torch.equal(got, want.to(got.device)):
                return False
    return True


def _make_fn(op, backend, var, lay, caches, src, fmt, slots, sc, hkv, hout, L, NB, BS, H, D, n):
    """(callable, None) or (None, why it cannot run)."""
    host = var.startswith("host")
    if host:
        path = "kernel" if var == "host-kernel" else "copy"
        b = backend
        if path == "kernel" and b != "cuda":
            return None, "the host kernel path is the CUDA kernel's"
        why = dispatch.refusal(op, b, lay, src, None, 0) if path == "copy" else None
        if why:
            return None, why
        sms = max(1, torch.cuda.get_device_properties(0).multi_processor_count // 4) if path == "kernel" else 0
        if op == "scatter":
            return (lambda: kvkernels.scatter(hkv, lay, slots, host_path=path, max_sms=sms, backend=b)), None
        return (lambda: kvkernels.gather(lay, slots, out=hout, host_path=path, max_sms=sms, backend=b)), None
    if backend == "torch-loop":
        if fmt is not None:
            return None, "a format is not a torch one-liner"
        views = [c.view(2, NB * BS, H, D) for c in caches]
        if var == "fp8cache":
            return None, "no torch one-liner for an fp8 cache with per-head scales"
        if op == "scatter":
            kvv = src

            def loop():
                for l, v in enumerate(views):
                    v[0].index_copy_(0, slots, kvv[0, l])
                    v[1].index_copy_(0, slots, kvv[1, l])
            return loop, None
        out = torch.empty(2, L, slots.shape[0], H, D, dtype=torch.bfloat16, device=slots.device)

        def loop_g():
            for l, v in enumerate(views):
                torch.index_select(v[0], 0, slots, out=out[0, l])
                torch.index_select(v[1], 0, slots, out=out[1, l])
            return out
        return loop_g, None
    per_layer = backend.endswith("-per-layer")
    b = backend[: -len("-per-layer")] if per_layer else backend
    t = src.codes if hasattr(src, "codes") else src
    if op == "gather" and fmt is not None and kvkernels.paged.fused_gather_format(fmt):
        t = torch.empty(1, device=slots.device)
    why = dispatch.refusal(op, b, lay, t, fmt if (op == "scatter" or fmt is None or
                                                  kvkernels.paged.fused_gather_format(fmt)) else None, 0)
    if why:
        return None, why
    if b == "torch" and n > REFERENCE_MAX_ELEMS:
        return None, f"the reference is not timed above {REFERENCE_MAX_ELEMS} elements"
    if per_layer:
        if fmt is not None:
            return None, "per-layer baseline: plain and fp8-cache variants only"
        lays = [PagedLayout.vllm_flash([c], kv_dim=0) for c in caches]
        ks, vs = sc.get("k_scale"), sc.get("v_scale")
        if op == "scatter":
            def per():
                for l, ly in enumerate(lays):
                    kvkernels.scatter(src[:, l:l + 1], ly, slots, backend=b,
                                      **({"k_scale": ks, "v_scale": vs} if sc else {}))
            return per, None
        out = torch.empty(2, L, slots.shape[0], H, D, dtype=torch.bfloat16, device=slots.device)

        def per_g():
            for l, ly in enumerate(lays):
                kvkernels.gather(ly, slots, out=out[:, l:l + 1], backend=b, **({"k_scale": ks, "v_scale": vs} if sc else {}))
            return out
        return per_g, None
    if op == "scatter":
        return (lambda: kvkernels.scatter(src, lay, slots, backend=b, **sc)), None
    if fmt is None:
        out = torch.empty(2, L, slots.shape[0], H, D, dtype=torch.bfloat16, device=slots.device)
        return (lambda: kvkernels.gather(lay, slots, out=out, backend=b, **sc)), None
    return (lambda: kvkernels.gather(lay, slots, format=fmt, backend=b, **sc)), None


def _fmt_row(r):
    return (f"{r['op']:8s} {r['format']:17s} {r['backend']:18s} {r['model']:17s} T={r['T']:<6d}"
            f"{r['bytes'] / 2**20:10.1f} MiB {r['median_us']:10.1f} us {r['GBps']:8.1f} GB/s "
            f"{r['pct_copy']:5.1f}% of {r['baseline']}  {r['check']}")


CASES = {"scatter": run, "gather": run}
FAMILY = "paged"
