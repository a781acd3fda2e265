"""Markdown table from a bench JSON: ``python -m bench.report bench/results/<file>.json``.

One row per (op, format, model, T): each backend's GB/s and % of the device copy measured in
the same run, and the data-movement ceiling of the op's read:write mix (bench/ceiling.py) as
GB/s and % of that copy. The README's bench table is generated with this.

``python -m bench.report FILE --summary quant``: the README's one line for the family.
CPU rows (``gpu`` = "none ...", % of copy nan) give a functional table without percentages.

``python -m bench.report FILE --below 90 [--min-mib 64]``: instead, the rows of at least
``min-mib`` MiB moved that reach less than that % of copy (issue #2's target: 90, 64), with a count.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from collections import OrderedDict


def _pct_ok(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _is_cpu(rows) -> bool:
    return any(str(r.get("gpu", "")).startswith("none") for r in rows)


def table(rows, backends=("cuda", "triton", "torch")) -> str:
    ran = [r for r in rows if r.get("status") == "ran"]
    if not ran:
        return "(no rows)"
    r0 = ran[0]
    if _is_cpu(ran) or not any(_pct_ok(r.get("pct_copy")) for r in ran):
        return _cpu_table(ran, backends)
    head = (f"{r0['gpu']}, torch {r0['torch']}, triton {r0['triton']}, CUDA {r0.get('cuda')}, {r0['date']}; "
            f"bf16 input, GB/s counts bytes read + written; % = of a device-to-device copy of the same bytes "
            f"in the same run ({r0.get('copy_GBps', 0):.0f} GB/s at the first size).")
    groups = OrderedDict()
    for r in ran:
        groups.setdefault((r["op"], r["format"], r["model"], r["T"], r["bytes"]), {})[r["backend"]] = r
    bs = [b for b in backends if any(b in g for g in groups.values())]
    has_mix = any(r.get("mix_GBps") for r in ran)
    mix_head = " | mix ceiling GB/s (% copy)" if has_mix else ""
    lines = [head, "", "| op | format | shape | MiB moved | " + " | ".join(f"{b} GB/s (% copy)" for b in bs)
             + mix_head + " |", "| --- | --- | --- | --- | " + " | ".join("---" for _ in bs)
             + (" | ---" if has_mix else "") + " |"]
    for (op, fmt, model, T, nbytes), g in groups.items():
        r = next(iter(g.values()))
        cells = [f"{g[b]['GBps']:.0f} ({g[b]['pct_copy']:.0f}%)" if b in g else "—" for b in bs]
        if has_mix:
            m = r.get("mix_GBps")
            cells.append(f"{m:.0f} ({100 * m / r['copy_GBps']:.0f}%)" if m else "—")
        lines.append(f"| `{op}` | `{fmt}` | {model} {r['L']}×{T}×{r['H']}×{r['D']} | {nbytes / 2**20:.0f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cpu_table(ran, backends) -> str:
    """CPU rows: the reference check and host time only (no % of copy: see bench/harness.CPU_NOTE)."""
    r0 = ran[0]
    bs = [b for b in backends if any(r["backend"] == b for r in ran)]
    lines = [f"{r0['gpu']}, torch {r0['torch']}, {r0['date']}: a functional run (reference check + host time "
             f"per call); not a speed measurement, no % of copy.", "",
             "| op | format | shape | " + " | ".join(f"{b} check, ms" for b in bs) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in bs) + " |"]
    groups = OrderedDict()
    for r in ran:
        groups.setdefault((r["op"], r["format"], r["model"], r["T"]), {})[r["backend"]] = r
    for (op, fmt, model, T), g in groups.items():
        r = next(iter(g.values()))
        cells = [f"{g[b].get('check', '?')}, {g[b]['median_us'] / 1e3:.2f}" if b in g else "—" for b in bs]
        lines.append(f"| `{op}` | `{fmt}` | {model} {r['L']}×{T}×{r['H']}×{r['D']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows, family: str, target: float = 90, min_mib: float = 64) -> str:
    """One line for the README: the family's GPU, how many large rows reach ``target`` % of copy,
    and the range and median of % of copy over those rows (every backend)."""
    ran = [r for r in rows if r.get("status") == "ran" and _pct_ok(r.get("pct_copy"))]
    if not ran:
        return f"{family}: no GPU rows"
    big = [r for r in ran if r["bytes"] >= min_mib * 2**20] or ran
    pct = [r["pct_copy"] for r in big]
    ok = sum(p >= target for p in pct)
    ops = "/".join(sorted({r["op"] for r in big}, reverse=True))
    fmts = len({r["format"] for r in big})
    bes = ", ".join(sorted({r["backend"] for r in big}))
    return (f"**{family}** ({ops}, {fmts} formats, {bes}) on {big[0]['gpu']}: {ok} of {len(big)} rows of "
            f">= {min_mib:g} MiB at >= {target:g}% of a device copy; median {statistics.median(pct):.0f}%, "
            f"range {min(pct):.1f}-{max(pct):.1f}%")


def below(rows, pct: float, min_mib: float = 64) -> str:
    """The rows of >= min_mib MiB moved under pct % of copy, after a count of those that reach it."""
    big = [r for r in rows if r.get("status") == "ran" and _pct_ok(r.get("pct_copy"))
           and r["bytes"] >= min_mib * 2**20]
    low = [r for r in big if r["pct_copy"] < pct]
    lines = [f"{len(big) - len(low)} of {len(big)} rows of >= {min_mib:g} MiB at >= {pct:g}% of copy"]
    lines += [f"  {r['op']:10s} {r['format']:18s} {r['backend']:6s} {r['model']:12s} T={r['T']:<6d} "
              f"{r['pct_copy']:6.2f}%" for r in low]
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench.report")
    ap.add_argument("json")
    ap.add_argument("--below", type=float, help="list the rows under this %% of copy instead of the table")
    ap.add_argument("--min-mib", type=float, default=64)
    ap.add_argument("--summary", metavar="FAMILY", help="print the README's one-line summary instead")
    args = ap.parse_args()
    with open(args.json) as f:
        rows = json.load(f)
    if args.summary:
        print(summary(rows, args.summary, min_mib=args.min_mib))
    else:
        print(table(rows) if args.below is None else below(rows, args.below, args.min_mib))
