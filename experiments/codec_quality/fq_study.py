"""Fake-quant study: Fisher-allocated per-channel steps, sink exact, shared per-channel tables.

bits = cross-entropy of the eval text's symbols under 12-bit tables normalized from the
profile text's histograms (what a shared bank gives) + side info (16-bit zero and step per
(chunk, channel), sink token fp16) over all elements.
"""
import json, math, sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import *
from kvkernels.codec import tables as TB

CFG = {}

def f16(x):
    return x.clamp(-65504, 65504).half().float()

def make_q(dprof, B, ct, sink, mode="abs"):
    """quantizer(kind, layer, t [T, C]) -> (recon [T, C], sym [T', C] of coded tokens)."""
    def q(k, l, t):
        T, C = t.shape
        out = t.clone()
        syms = []
        for c0 in range(0, T, ct):
            seg = t[c0:c0 + ct]
            lo = sink - c0 if c0 < sink else 0
            lo = max(lo, 0)
            body = seg[lo:]
            if body.shape[0] == 0:
                continue
            z = f16(body.mean(0))
            dev = (body - z).abs().amax(0)
            b = B[k][l]
            d = torch.maximum(dprof[k, l], dev / (b // 2 - 1) * 1.0001)
            d = f16(d)
            s = (torch.round((body - z) / d) + b // 2).clamp(0, b - 1)
            out[c0 + lo:c0 + ct] = (s - b // 2) * d + z
            syms.append(s.to(torch.int64))
        if sink:
            out[:sink] = f16(t[:sink])
        return out, torch.cat(syms)
    return q

def hist(symlist, W):
    C = symlist.shape[1]
    cnt = torch.zeros(C, W, dtype=torch.int64)
    cnt.scatter_add_(1, symlist.t(), torch.ones_like(symlist.t()))
    return cnt

def steps(F, T, lam, floor=None):
    # Delta_c = sqrt(lam / Fbar_c) with Fbar = F / T (per-token average Fisher)
    Fb = (F / T).clamp_min(1e-12)
    return torch.sqrt(lam / Fb)

def choose_bins(kvp, dprof, ct, sink):
    """bins per (kind, layer): cover the profile's deviations at the profiled step (even, <=256)."""
    _, L, T, C = kvp.shape
    B = [[0] * L for _ in range(2)]
    for k in range(2):
        for l in range(L):
            mx = 0.0
            for c0 in range(0, T, ct):
                body = kvp[k, l, max(c0, sink):c0 + ct]
                dev = (body - body.mean(0)).abs() / dprof[k, l]
                mx = max(mx, float(torch.quantile(dev.amax(0), 0.99)))
            B[k][l] = int(min(256, max(4, 2 * math.ceil(mx + 1))))
    return B

def evaluate(model, ids, kv_eval_shape, q, Bs, banks, ct, sink, pb=12):
    L = model.config.num_hidden_layers
    ent = {"bits": 0.0, "n": 0}
    only = CFG.get("only")
    def fq(li, kind, t):
        if only is not None and kind != only:
            return t
        y, s = q(kind, li, t)
        f = TB.normalize(banks[kind][li], Bs[kind][li], pb).double()  # [C, W]
        p = torch.gather(f, 1, s.t()) / (1 << pb)
        ent["bits"] += float(-torch.log2(p).sum())
        ent["n"] += s.numel()
        return y
    p, kv = run_fq(model, ids, fq)
    _, L, T, H, D = kv.shape
    C = H * D
    nch = math.ceil(T / ct)
    side = 2 * L * nch * C * 32 + 2 * L * sink * C * 16
    total = 2 * L * T * C
    return p, (ent["bits"] + side) / total, ent["bits"] / ent["n"]

if __name__ == "__main__":
    cfg = json.loads(sys.argv[1])
    CFG.update(cfg)
    model, tok = load()
    L = model.config.num_hidden_layers
    fis = torch.load(CACHE / "fisher_2048.pt")
    kvp_path = CACHE / "kv_profile2048.pt"
    if not kvp_path.exists():
        _, kvp = run_fq(model, cq.profile_ids(tok, 2048), None)
        torch.save(kvp, kvp_path)
    kvp = torch.load(kvp_path)
    kvp = kvp.reshape(2, L, kvp.shape[2], -1)
    res_all = []
    for text in cfg.get("texts", ["Pride and Prejudice"]):
        ids = ids_of(tok, text, cfg.get("tokens", 2048))
        basep = cfg.get("base", {}).get(text)
        if basep is None:
            basep, _ = run_fq(model, ids, None)
        for lam in cfg["lams"]:
            ct, sink = cfg.get("ct", 256), cfg.get("sink", 1)
            dprof = steps(fis["F"], fis["T"], lam)
            alpha = cfg.get("alpha")
            if alpha is not None:
                sd = kvp[:, :, 1:].std(2)
                dprof = torch.minimum(dprof, alpha * sd)
            kscale = cfg.get("kscale", 1.0)
            dprof[0] *= kscale
            Bs = choose_bins(kvp, dprof, ct, sink)
            q = make_q(dprof, Bs, ct, sink)
            banks = [[None] * L for _ in range(2)]
            for k in range(2):
                for l in range(L):
                    _, s = q(k, l, kvp[k, l])
                    banks[k][l] = hist(s, Bs[k][l]) + 0
            t0 = time.time()
            p, bits, sb = evaluate(model, ids, None, q, Bs, banks, ct, sink)
            r = dict(only=cfg.get('only'), text=text, lam=lam, alpha=cfg.get('alpha'), ct=ct, sink=sink, kscale=kscale, bits=round(bits, 4), sym_bits=round(sb, 4),
                     ppl=round(p, 4), delta=round(100 * (p / basep - 1), 3), s=round(time.time() - t0, 1),
                     bins_k=Bs[0], bins_v=Bs[1])
            print(json.dumps({k: v for k, v in r.items() if not k.startswith("bins")}), flush=True)
            res_all.append(r)
    with open(CACHE / "results.jsonl", "a") as fh:
        for r in res_all:
            fh.write(json.dumps(r) + "\n")
