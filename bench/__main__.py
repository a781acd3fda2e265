"""``python -m bench quant [--backends cuda,triton,torch] [--out DIR]``.

For each backend: a reference check, then the median time after warm-up (L2 flushed, CUDA
events), GB/s from the bytes read plus written, and the ratio to a device-to-device copy of
the same bytes measured in the same run. Rows go to JSON and CSV with GPU name and versions.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import torch

from .cases import blend, codec, paged, quant
from .harness import CPU_NOTE, CopyBaseline, Timer, env_info

# family -> (runner, its ops), from each case module (its CASES name the ops)
FAMILIES = {m.FAMILY: (m.run, sorted(m.CASES, reverse=True)) for m in (quant, paged, codec, blend)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("family", choices=sorted(FAMILIES))
    p.add_argument("--backends", default=None, help="comma list (default: cuda,triton,torch on a GPU; torch on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, nargs="*", help="token counts to run (default: real-model sizes)")
    p.add_argument("--formats", nargs="*", help="formats (default: the main ones); fp8 with a '+given' suffix "
                   "quantizes with a given scale (one pass) instead of computing it")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out", default=None, help="folder for <family>.json / <family>.csv")
    args = p.parse_args(argv)
    args.backends = (args.backends or ("cuda,triton,torch" if args.device == "cuda" else "torch")).split(",")
    info = env_info(args.device)
    print(" ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    if args.device != "cuda":
        print(CPU_NOTE, flush=True)
    timer = Timer(args.device, reps=args.reps or (30 if args.device == "cuda" else 5))
    run, ops = FAMILIES[args.family]
    rows = run(args, timer, CopyBaseline(timer), info, ops)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"{args.family}.json"), "w") as f:
            json.dump(rows, f, indent=1)
        keys = sorted({k for r in rows for k in r})
        with open(os.path.join(args.out, f"{args.family}.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    bad = [r for r in rows if r.get("check") == "MISMATCH"]
    for r in rows:
        if r["status"] != "ran":
            print(f"{r['op']} {r['format']} {r['backend']}: {r['status']}")
    if bad:
        print(f"{len(bad)} rows failed the reference check", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
