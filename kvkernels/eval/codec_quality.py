"""Codec quality study: real container size vs perplexity of SmolLM2-135M-Instruct.

For each text (the bundled Pride and Prejudice and Persuasion excerpts), each preset and each
chunk size: bits per element = ``len(kvkernels.codec.encode(kv, ...)) * 8 / kv.numel()`` of the
full-precision KV (everything included: header, tables, scales, offsets, checksums) and the
perplexity with every layer's K/V replaced, as the layer writes it, by the preset's
reconstruction (the values ``decode`` returns), vs full-precision KV.

    python -m kvkernels.eval.codec_quality --out docs/            # the table + plot
    python -m kvkernels.eval.codec_quality --profile               # rebuild the bundled bank
    python -m kvkernels.eval.codec_quality --steps                 # rebuild the Fisher step profile
    python -m kvkernels.eval.codec_quality --sensitivity           # per-layer sensitivity (affine_v1)

The default preset's per-channel steps come from ``--steps`` (the diagonal Fisher information
of every cached element) and its shared per-channel tables from ``--profile``, both measured
on a third text (the opening chapters of Pride and Prejudice, not either evaluation excerpt).
"""
from __future__ import annotations

import argparse
import datetime
import inspect as _inspect
import json
import math
import time
from pathlib import Path
from typing import Callable, List, Optional

import torch

from . import ppl as _ppl

DATA = Path(__file__).resolve().parent.parent / "data"
TEXTS = {"Pride and Prejudice": DATA / "pride_prejudice_excerpt.txt", "Persuasion": DATA / "persuasion_excerpt.txt"}
PROFILE_TEXT = Path("/work/shared/data/text/prideprejudice.txt")
MODEL_NAME = "SmolLM2-135M-Instruct"


def _cache_class():
    from transformers import DynamicCache

    class Cache(DynamicCache):
        """DynamicCache that records the raw new K/V and stores ``fq(layer, kind, x)``."""

        def __init__(self, *a, fq=None, **k):
            super().__init__(*a, **k)
            self.fq, self.raw = fq, []

        def update(self, ks, vs, li, *a, **k):
            self.raw.append((ks.detach(), vs.detach()))
            if self.fq is not None:
                ks, vs = self.fq(li, 0, ks), self.fq(li, 1, vs)
            return super().update(ks, vs, li, *a, **k)

    return Cache


@torch.no_grad()
def run(model, ids, fq: Optional[Callable] = None):
    """(perplexity, raw KV [2, L, T, H, D] float32) with K/V passed through ``fq`` as written."""
    cache = _cache_class()(config=model.config, fq=fq)
    key = "cache" if "cache" in _inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=ids, use_cache=True, **{key: cache})
    lg = out.logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1))
    kv = torch.stack([torch.stack([r[k][0].transpose(0, 1) for r in cache.raw]) for k in range(2)])
    return math.exp(nll.item()), kv.float()


def fake_quant(preset, chunk: int, only=None):
    """``fq`` replacing HF K/V ``[1, H, T, D]`` by the preset's reconstruction (chunked)."""
    from ..codec import presets as P

    def fq(li, kind, x):
        if only is not None and (li, kind) != only:
            return x
        _, H, T, D = x.shape
        t = x[0].transpose(0, 1).reshape(T, H * D)
        y = P.fake_quant_layer(t, preset.kind(kind), li, chunk)
        return y.reshape(T, H, D).transpose(0, 1).unsqueeze(0).to(x.dtype)

    return fq


def tokens(tok, path, n):
    return _ppl.load_excerpt_tokens(tok, n, path)


def sensitivity(model, ids, chunk=256) -> dict:
    """Perplexity change (%) of quantizing one (kind, layer) alone at step 1.0 (all others exact)."""
    from ..codec import presets as P

    L = model.config.num_hidden_layers
    base, _ = run(model, ids)
    pr = P.default(L, steps=([1.0] * L, [1.0] * L), bins=([64] * L, [64] * L))
    out = {"k": [], "v": []}
    for kind in (0, 1):
        for li in range(L):
            p, _ = run(model, ids, fake_quant(pr, chunk, only=(li, kind)))
            out["kv"[kind]].append(100.0 * (p / base - 1.0))
            print(f"sensitivity {'KV'[kind]}{li}: {out['kv'[kind]][-1]:+.2f}%", flush=True)
    return out


def profile_ids(tok, n_tokens=2048):
    text = PROFILE_TEXT.read_text(encoding="utf-8")
    return tok(text[: 12 * n_tokens], return_tensors="pt", add_special_tokens=False).input_ids[:, :n_tokens]


_PROFILE_KV = {}


def profile(model, tok, n_tokens=2048, chunk=256, preset=None, name=MODEL_NAME, per_channel=None) -> bytes:
    """Bank bytes: histograms of the default (or ``preset``'s) symbols on the profile text.

    ``per_channel`` (default: for channel_delta presets): one row per (kind, layer, channel)
    (stored zlib-compressed, bank version 2), else one row per (kind, layer).
    """
    from ..codec import presets as P
    from ..codec import tables as TB

    if n_tokens not in _PROFILE_KV:
        _PROFILE_KV[n_tokens] = run(model, profile_ids(tok, n_tokens))[1]
    kv = _PROFILE_KV[n_tokens]
    _, L, T, H, D = kv.shape
    C = H * D
    pr = P.get("default", L, MODEL_NAME) if preset is None else preset
    if per_channel is None:
        per_channel = pr.k.mode == "channel_delta"
    W = pr.bins_max()
    counts = torch.zeros(2, L, C, W, dtype=torch.int64)
    nf = T // chunk
    x = kv.reshape(2, L, T, C)
    for k in range(2):
        spec = pr.kind(k)
        for l in range(L):
            seg = x[k, l, : nf * chunk].reshape(nf, chunk, C).clone()
            if spec.exact:
                seg[0] = P.neutralize(seg[0], spec.exact)
            sym, _ = P.quantize(seg, spec, l)
            s = sym.reshape(-1, C).t().long()
            counts[k, l].scatter_add_(1, s, torch.ones_like(s))
    if not per_channel:
        counts = counts.sum(2, keepdim=True)
    return TB.bank_to_bytes(name, counts)


def kv_fisher(model, ids, n_samples: int = 4, seed: int = 0) -> torch.Tensor:
    """float64 ``[2, L, T, C]``: the mean over ``n_samples`` backwards of the squared gradient of
    the summed NLL w.r.t. every cached K / V element, labels sampled from the model's own
    predictions (so one sample is an unbiased estimate of the diagonal Fisher information)."""
    from transformers import DynamicCache

    class GradCache(DynamicCache):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.leaves = []

        def update(self, ks, vs, li, *a, **k):
            ks, vs = ks.detach().requires_grad_(), vs.detach().requires_grad_()
            self.leaves.append((ks, vs))
            return super().update(ks, vs, li, *a, **k)

    T = ids.shape[1]
    g = torch.Generator().manual_seed(seed)
    key = "cache" if "cache" in _inspect.signature(model.forward).parameters else "past_key_values"
    acc = None
    for _ in range(n_samples):
        cache = GradCache(config=model.config)
        out = model(input_ids=ids, use_cache=True, **{key: cache})
        lg = out.logits[0, :-1].float()
        y = torch.multinomial(torch.softmax(lg.detach(), -1), 1, generator=g)[:, 0]
        torch.nn.functional.cross_entropy(lg, y, reduction="sum").backward()
        gr = torch.stack([torch.stack([kv[k].grad[0].transpose(0, 1).reshape(T, -1) for kv in cache.leaves])
                          for k in range(2)])  # [2, L, T, C]
        sq = gr.double() ** 2
        acc = sq if acc is None else acc + sq
        model.zero_grad(set_to_none=True)
    return acc / n_samples


def fisher_profile(model, tok, n_tokens=2048, n_samples=4, chunk=256, seed=0) -> dict:
    """The default's step profile on the profile text: per (kind, layer, channel) the per-token
    diagonal Fisher information of the cached element (tokens 1..; labels sampled from the
    model, so one backward's squared gradient is an unbiased estimate), the std (tokens 1..)
    and the median over ``chunk``-token chunks of max |x - chunk mean| (sizes the bins)."""
    import base64

    ids = profile_ids(tok, n_tokens)
    T = ids.shape[1]
    F = kv_fisher(model, ids, n_samples, seed)
    fisher = (F[:, :, 1:].sum(2) / (T - 1)).float()
    with torch.no_grad():
        _, kv = run(model, ids)
    x = kv.reshape(2, kv.shape[1], T, -1)
    std = x[:, :, 1:].std(2, unbiased=False)
    devs = []
    for t0 in range(0, T - chunk + 1, chunk):
        seg = x[:, :, max(t0, 1):t0 + chunk]
        devs.append((seg - seg.mean(2, keepdim=True)).abs().amax(2))
    dev = torch.stack(devs).median(0).values

    def b64(t):
        return base64.b64encode(t.contiguous().numpy().astype("<f4").tobytes()).decode()

    return {"model": MODEL_NAME, "shape": list(fisher.shape), "chunk": chunk,
            "basis": f"diagonal Fisher of the mean NLL per cached element (labels sampled, {n_samples} "
                     f"samples), std and median chunk max-deviation; {T} tokens of {PROFILE_TEXT.name} "
                     "(python -m kvkernels.eval.codec_quality --steps)",
            "fisher": b64(fisher), "std": b64(std), "dev": b64(dev)}


CURVE = (1.25, 1.5, 3.0, 10.0, 100.0)  # the default's lam times these: the size-perplexity curve


def study(model, tok, n_tokens=2048, chunks=(256, 1024), coder="rans", extra=True, texts=None) -> List[dict]:
    from .. import codec
    from ..codec import presets as P
    from ..codec import tables as TB

    L = model.config.num_hidden_layers
    C = model.config.num_key_value_heads * (getattr(model.config, "head_dim", None) or
                                            model.config.hidden_size // model.config.num_attention_heads)
    cands = [("cachegen", P.cachegen(L), MODEL_NAME, chunks),
             ("default", P.get("default", L, MODEL_NAME), MODEL_NAME, chunks),
             ]
    if extra:  # the default at coarser steps, each with its own bank profiled on the profile text
        for f in CURVE:
            lam = P.FISHER_LAM * f
            cands.append((f"default, lam x{f:g}", P.fisher(L, model=MODEL_NAME, lam=lam), f"{MODEL_NAME} lam x{f:g}", (256,)))
    for name, pr, mname, _ in cands:
        if mname != MODEL_NAME and TB.bank_for(mname, L, C) is None:
            TB.register_bank(profile(model, tok, preset=pr, name=mname, per_channel=pr.k.mode == "channel_delta"))
    rows = []
    for text, path in TEXTS.items():
        if texts and text not in texts:
            continue
        ids = tokens(tok, path, n_tokens)
        base, kv = run(model, ids)
        rows.append(dict(text=text, preset="full precision (fp32 KV)", chunk=None, bits=32.0, ppl=base, delta=0.0))
        print(rows[-1], flush=True)
        for name, pr, mname, chs in cands:
            for ch in chs:
                t0 = time.perf_counter()
                data = codec.encode(kv, pr, chunk_tokens=ch, coder=coder, model=mname)
                info = codec.inspect(data)
                p, _ = run(model, ids, fake_quant(pr, ch))
                rows.append(dict(text=text, preset=name, chunk=ch, bits=8.0 * len(data) / kv.numel(), ppl=p,
                                 delta=100.0 * (p / base - 1.0), tables=info.table_mode,
                                 seconds=round(time.perf_counter() - t0, 1)))
                print(rows[-1], flush=True)
    return rows


def markdown(rows, setup) -> str:
    lines = ["# Codec quality: size vs perplexity on SmolLM2-135M-Instruct", "",
             "Generated by `python -m kvkernels.eval.codec_quality --out docs/` (" +
             ", ".join(f"{k}: {v}" for k, v in setup.items()) + ").", "",
             "Bits per element = real container bytes x 8 / elements (header, tables, scales, offsets, "
             "checksums included); perplexity with every layer's K/V replaced by the decoded values as "
             "it writes them; delta vs full-precision KV.", "",
             "| text | preset | chunk tokens | tables | bits/element | x vs fp16 | perplexity | delta |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["chunk"] is None:
            lines.append(f"| {r['text']} | {r['preset']} | | | 32 | | {r['ppl']:.3f} | -- |")
        else:
            lines.append(f"| {r['text']} | {r['preset']} | {r['chunk']} | {r.get('tables', '')} | {r['bits']:.3f} | "
                         f"{16 / r['bits']:.2f} | {r['ppl']:.3f} | {r['delta']:+.2f}% |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for text, mk in zip(TEXTS, "os"):
        for preset, color in (("cachegen", "tab:red"), ("default", "tab:blue"), ("affine_v1", "tab:gray")):
            pts = [r for r in rows if r["text"] == text and r["chunk"] and r["preset"].startswith(preset)]
            pts.sort(key=lambda r: r["bits"])
            if pts:
                if preset == "default":
                    pts = [r for r in pts if r["chunk"] == 256]
                ax.plot([r["bits"] for r in pts], [r["delta"] for r in pts], mk + ("-" if preset == "default" else ""),
                        color=color, label=f"{preset} ({text})", alpha=0.8)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("bits per element (real container, everything included)")
    ax.set_ylabel("perplexity change vs full-precision KV (%)")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylim(-0.3, 60)
    ax.set_title("SmolLM2-135M-Instruct: codec size vs perplexity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvkernels.eval.codec_quality", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder for codec-quality.md and codec-quality.png")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--coder", default="rans")
    ap.add_argument("--no-extra", action="store_true", help="only the two presets (no step-scaled points)")
    ap.add_argument("--profile", action="store_true", help="write kvkernels/data/smollm2-135m-instruct.kvtables")
    ap.add_argument("--sensitivity", action="store_true", help="print the per-(kind, layer) sensitivity as JSON")
    ap.add_argument("--text", action="append", default=None, help="only this text (repeatable)")
    ap.add_argument("--merge", nargs="+", default=None, help="write --out from these JSON results instead of measuring")
    ap.add_argument("--steps", action="store_true", help="write kvkernels/data/smollm2-135m-instruct.kvsteps.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        rows = [r for p in parts for r in p["rows"]]
        setup = dict(parts[0]["setup"])
        setup["minutes"] = round(sum(p["setup"]["minutes"] for p in parts), 1)
        _write(rows, setup, args.out)
        return 0
    model, tok = _ppl.load_smollm2("cpu", torch.float32)
    if args.sensitivity:
        ids = tokens(tok, TEXTS["Pride and Prejudice"], 1024)
        print(json.dumps(sensitivity(model, ids)))
        return 0
    if args.steps:
        p = DATA / "smollm2-135m-instruct.kvsteps.json"
        p.write_text(json.dumps(fisher_profile(model, tok), indent=0))
        print(f"wrote {p}")
        return 0
    if args.profile:
        data = profile(model, tok)
        p = DATA / "smollm2-135m-instruct.kvtables"
        p.write_bytes(data)
        print(f"wrote {p} ({len(data)} bytes)")
        return 0
    t0 = time.perf_counter()
    rows = study(model, tok, args.tokens, coder=args.coder, extra=not args.no_extra, texts=args.text)
    setup = dict(model=f"{MODEL_NAME} (GGUF Q4_1 dequantized to fp32)", tokens=args.tokens, coder=args.coder,
                 date=datetime.date.today().isoformat(), device=f"cpu ({_ppl._cpu_name()})",
                 minutes=round((time.perf_counter() - t0) / 60, 1))
    _write(rows, setup, args.out)
    return 0


def _write(rows, setup, out):
    md = markdown(rows, setup)
    print(md)
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "codec-quality.json").write_text(json.dumps(dict(setup=setup, rows=rows), indent=1))
        (out / "codec-quality.md").write_text(md)
        plot(rows, out / "codec-quality.png")


if __name__ == "__main__":
    raise SystemExit(main())
