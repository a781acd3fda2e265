"""Sweep the launch configurations of the Triton quantize/dequantize kernels on a GPU.

    PYTHONPATH=. python experiments/triton_tune.py [--tokens 4096 32768] [--budget 200] [--shape 32,8,128]
        [--only q_channel,q_token] [--baseline OLD_quant.py] [--json rows.json]
        [--write-best best.json]

For the bench shape (bf16 Llama-3-8B K cache [32, T, 8, 128], random data) and each kernel's
candidate entries of ``kvkernels.triton_kernels.quant.CONFIG`` (``SWEEP`` below): run the op,
check it against the torch reference (codes/scales/zeros and dequantized values bit for bit),
then time it (bench/harness.py: CUDA events around a graph replay, L2 flushed, median) and print the % of a
device-to-device copy of the same bytes (read + written) measured in the same run.
``--baseline`` also times another copy of the module (e.g. the previous version, with its own
defaults). Stops sweeping after ``--budget`` seconds (compiles dominate) and prints the best
entry per (kernel, format, T); ``--write-best`` writes, per kernel, the entry with the best mean
over its formats and sizes (what CONFIG should say). ``--device cpu`` under TRITON_INTERPRET=1
is a smoke test of this script only. Private tool: not part of the package or the tests.
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import sys
import time

import torch

from bench.harness import CopyBaseline, Timer
from kvkernels.formats import QuantFormat
from kvkernels.reference import quant as ref
from kvkernels.triton_kernels import quant as tq

# default bench shape: --shape 32,8,128 (Llama-3-8B K); --device cpu (a smoke test under
# TRITON_INTERPRET=1) uses one layer


def grid(**axes):
    keys = list(axes)
    return [dict(zip(keys, v)) for v in itertools.product(*axes.values())]


# kernel key -> (op, formats, candidate configs)
SWEEP = {
    "q_token": ("quantize", ["int4:g32:token", "int2:g32:token"],
                grid(thread_elems=[64, 128], warps=[1, 2, 4], pairs=[1])),
    "q_channel": ("quantize", ["int4:g32:channel", "int2:g32:channel", "int8:g64:channel"],
                  [dict(elems=e, warps=w, row_elems=r) for e, w, r in
                   [(4096, 4, 32), (2048, 2, 32), (8192, 8, 32), (4096, 4, 16), (8192, 4, 32)]]),
    "q_fp8": ("quantize", ["fp8:token_head"],
              [dict(elems=8192, warps=8, row_elems=32), dict(elems=8192, warps=8, row_elems=16),
               dict(elems=4096, warps=4, row_elems=32)]),
    "dq_token": ("dequantize", ["int4:g32:token", "int2:g32:token"],
                 grid(elems=[8192, 16384], warps=[2, 4, 8])),
    # (int4/int2 channel dequantize use _dq_int_channel_flat, which has no CONFIG entry)
    "dq_channel": ("dequantize", ["int8:g64:channel"],
                   grid(elems=[16384, 32768], warps=[8, 16], row_elems=[8])),
    "dq_fp8": ("dequantize", ["fp8:token_head"], []),
}


class Bench:
    """Timing and the copy baseline of the bench CLI (bench/harness.py): events around a graph
    replay, L2 flushed by a read, best-of-three-placement copy."""

    def __init__(self, reps: int, device: str):
        self.timer = Timer(device, warmup=3, reps=reps)
        self.copy = CopyBaseline(self.timer)

    def time_us(self, fn) -> float:
        return self.timer(fn)["median_us"]

    def copy_gbps(self, nbytes: int) -> float:
        return self.copy.gbps(nbytes)


class Case:
    """One format at one size: input, reference outputs, output buffers, bytes moved."""

    def __init__(self, x: torch.Tensor, spec: str):
        dev = x.device
        self.x, self.spec, self.fmt = x, spec, QuantFormat.parse(spec)
        Lx, T, Hx, Dx = x.shape
        f = self.fmt
        self.codes = torch.empty(f.codes_shape(Lx, T, Hx, Dx), dtype=torch.uint8, device=dev)
        self.scale = torch.empty(f.scale_shape(Lx, T, Hx, Dx), dtype=torch.float32, device=dev)
        self.zero = torch.empty_like(self.scale) if f.has_zero else None
        self.rc, self.rs = torch.empty_like(self.codes), torch.empty_like(self.scale)
        self.rz = torch.empty_like(self.scale) if f.has_zero else None
        ref.quantize_into(x, f, self.rc, self.rs, self.rz, True)
        self.rout = torch.empty_like(x)
        ref.dequantize_into(self.rc, self.rs, self.rz, f, self.rout)
        self.out = torch.empty_like(x)
        n = x.numel()
        meta = self.scale.numel() * 4 * (2 if f.has_zero else 1)
        self.nbytes = {"quantize": n * 2 + n * f.bits // 8 + meta,
                       "dequantize": n * f.bits // 8 + meta + n * 2}

    def fn(self, mod, op):
        if op == "quantize":
            return lambda: mod.quantize_into(self.x, self.fmt, self.codes, self.scale, self.zero, True)
        return lambda: mod.dequantize_into(self.rc, self.rs, self.rz, self.fmt, self.out)

    def poison(self, op) -> None:
        if op == "quantize":
            self.codes.fill_(0xAB)
            self.scale.fill_(float("nan"))
        else:
            self.out.fill_(float("nan"))

    def ok(self, op) -> str:
        """'ok' (bit-identical to the reference), 'close' (dequantize within the bench's
        tolerance, 2^-7 of max |out|) or 'MISMATCH'."""
        if op == "quantize":
            good = torch.equal(self.codes, self.rc) and torch.equal(self.scale, self.rs)
            return "ok" if good and (self.zero is None or torch.equal(self.zero, self.rz)) else "MISMATCH"
        if torch.equal(self.out, self.rout):
            return "ok"
        err = (self.out.float() - self.rout.float()).abs().max().item()
        return "close" if err <= 2**-7 * self.rout.abs().max().item() else "MISMATCH"


def load_module(path: str):
    # a single-file module (quant.py before the split) runs alone; a split entry file imports the
    # current quant_common / quant_int / ... kernels, so only its own code is the baseline's
    src = open(path).read().replace("from ..formats import", "from kvkernels.formats import")
    src = src.replace("from .quant_", "from kvkernels.triton_kernels.quant_")
    spec = importlib.util.spec_from_loader("quant_baseline", loader=None)
    mod = importlib.util.module_from_spec(spec)
    exec(compile(src, path, "exec"), mod.__dict__)
    return mod


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="*", default=[4096])
    p.add_argument("--budget", type=float, default=200.0, help="seconds of sweeping before stopping")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--only", default="", help="comma list of kernel keys (default: all)")
    p.add_argument("--baseline", default="", help="another quant.py to time with its defaults first")
    p.add_argument("--json", default="", help="write all rows here")
    p.add_argument("--write-best", default="", help="write {kernel: best config} (JSON) here: the config "
                   "with the best mean %% of copy over the kernel's formats and sizes")
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", default="32,8,128", help="layers,heads,head_dim of the bf16 input")
    args = p.parse_args(argv)
    t_start = time.time()
    bench = Bench(args.reps, args.device)
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (interpreter)"
    print(f"# {gpu}, torch {torch.__version__}, triton {__import__('triton').__version__}", flush=True)
    keys = [k for k in SWEEP if not args.only or k in args.only.split(",")]
    base = load_module(args.baseline) if args.baseline else None
    defaults = {k: dict(v) for k, v in tq.CONFIG.items()}
    rows = []
    stop = False
    for T in args.tokens:
        torch.manual_seed(T)
        nl, nh, hd = map(int, args.shape.split(","))
        layers = nl if args.device == "cuda" else 1
        x = (torch.randn(layers, T, nh, hd, device=args.device) * 2 + 0.5).to(torch.bfloat16)
        cases = {}
        for key in keys:
            op, fmts, cfgs = SWEEP[key]
            for spec in fmts:
                case = cases.setdefault(spec, Case(x, spec))
                nb = case.nbytes[op]
                copy = bench.copy_gbps(nb)
                variants = [("default", defaults[key])] + [("sweep", c) for c in cfgs if c != defaults[key]]
                if base is not None:
                    variants.insert(0, ("baseline", None))
                for kind, cfg in variants:
                    if stop and kind == "sweep":
                        continue
                    mod = base if kind == "baseline" else tq
                    if cfg is not None:
                        tq.CONFIG[key] = dict(defaults[key], **cfg)
                    fn = case.fn(mod, op)
                    try:
                        case.poison(op)
                        fn()
                        if args.device == "cuda":
                            torch.cuda.synchronize()
                        good = case.ok(op)
                        us = bench.time_us(fn)
                    except Exception as e:  # a config that does not compile or run
                        print(f"{key:10s} {spec:18s} T={T:<6d} {kind:8s} {cfg} ERROR "
                              f"{type(e).__name__}: {str(e)[:200]}", flush=True)
                        continue
                    finally:
                        tq.CONFIG[key] = dict(defaults[key])
                    pct = 100 * nb / us / 1e3 / copy
                    row = dict(key=key, op=op, format=spec, T=T, kind=kind, cfg=cfg, us=us, pct=pct,
                               ok=good, gpu=gpu)
                    rows.append(row)
                    if args.json:  # rewritten after each row: survives a time-out
                        with open(args.json, "w") as f:
                            json.dump(rows, f, indent=1)
                    print(f"{key:10s} {spec:18s} T={T:<6d} {kind:8s} {str(cfg):48s} {us:9.1f} us {pct:5.1f}% "
                          f"{good}", flush=True)
                    if time.time() - t_start > args.budget and not stop:
                        print("# budget spent: defaults/baselines only from here", flush=True)
                        stop = True
        del cases, x
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print("\n# best per (kernel, format, T) among correct configs")
    best = {}
    for r in rows:
        if r["ok"] != "MISMATCH" and r["kind"] != "baseline":
            k = (r["key"], r["format"], r["T"])
            if k not in best or r["us"] < best[k]["us"]:
                best[k] = r
    for (key, spec, T), r in best.items():
        same = [x for x in rows if (x["key"], x["format"], x["T"]) == (key, spec, T)]
        pct = {kind: next((x["pct"] for x in same if x["kind"] == kind), float("nan"))
               for kind in ("default", "baseline")}
        print(f"{key:10s} {spec:18s} T={T:<6d} best {r['pct']:5.1f}% {r['cfg']}  "
              f"default {pct['default']:5.1f}%  baseline {pct['baseline']:5.1f}%")
    if args.write_best:
        chosen = {}
        for key in keys:
            runs = {}
            for r in rows:
                if r["key"] == key and r["kind"] != "baseline":
                    runs.setdefault(json.dumps(r["cfg"], sort_keys=True), []).append(r)
            full = max((len(v) for v in runs.values()), default=0)
            scored = [(sum(r["pct"] for r in v) / len(v), c) for c, v in runs.items()
                      if len(v) == full and all(r["ok"] != "MISMATCH" for r in v)]
            if scored:
                pct, c = max(scored)
                chosen[key] = json.loads(c)
                print(f"# {key:10s} best mean {pct:5.1f}% {chosen[key]}")
        with open(args.write_best, "w") as f:
            json.dump(chosen, f)
    bad = [r for r in rows if r["ok"] == "MISMATCH" and r["kind"] != "baseline"]
    print(f"# {len(rows)} rows, {len(bad)} mismatches, {time.time() - t_start:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
