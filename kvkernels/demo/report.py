"""Summary table, per-question answers, ``--json`` and ``--plot`` of a run."""
from __future__ import annotations

import json
import statistics
from typing import List

from .run import METHOD_HELP, Answer


def summarize(answers: List[Answer], methods) -> List[dict]:
    rows = []
    for m in methods:
        a = [x for x in answers if x.method == m]
        if not a:
            continue
        graded = [x.correct for x in a if x.correct is not None]
        kls = [x.kl for x in a if x.kl is not None]
        fr = [x.recomputed_fraction for x in a if x.recomputed_fraction is not None]
        rows.append({"method": m, "questions": len(a), "ttft_ms": 1e3 * statistics.mean(x.ttft_s for x in a),
                     "ttft_ms_median": 1e3 * statistics.median(x.ttft_s for x in a),
                     "tokens_prefilled": statistics.mean(x.prefilled for x in a),
                     "bytes_read": statistics.mean(x.bytes_read for x in a),
                     "kl_vs_full": statistics.mean(kls) if kls else None,
                     "kl_vs_full_max": max(kls) if kls else None,
                     "correct": sum(graded) if graded else None, "graded": len(graded),
                     "recomputed_fraction": statistics.mean(fr) if fr else None})
    return rows


def _bytes(n: float) -> str:
    return "0" if not n else (f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB")


def table(rows: List[dict]) -> str:
    head = ("| method | TTFT ms (mean / median) | tokens prefilled | read from store | KL vs full prefill "
            "(mean / max, nats) | accuracy |")
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        kl = "—" if r["kl_vs_full"] is None else (
            "0 (reference)" if r["method"] == "full prefill" else f"{r['kl_vs_full']:.4f} / {r['kl_vs_full_max']:.4f}")
        acc = "n/a (random weights)" if r["correct"] is None else f"{r['correct']}/{r['graded']}"
        name = r["method"] + (f" (ratio {r['recomputed_fraction']:.2f})" if r["recomputed_fraction"] is not None else "")
        lines.append(f"| {name} | {r['ttft_ms']:.1f} / {r['ttft_ms_median']:.1f} | {r['tokens_prefilled']:.0f} | "
                     f"{_bytes(r['bytes_read'])} | {kl} | {acc} |")
    return "\n".join(lines)


def answers_table(answers: List[Answer], methods) -> str:
    qs = list(dict.fromkeys(a.question for a in answers))
    lines = ["| question | " + " | ".join(methods) + " |", "| --- |" + " --- |" * len(methods)]
    for q in qs:
        cells = []
        for m in methods:
            a = next((x for x in answers if x.question == q and x.method == m), None)
            if a is None:
                cells.append("—")
                continue
            mark = "" if a.correct is None else (" ✓" if a.correct else " ✗")
            t = a.text.replace("|", "/").replace("\n", " ")
            cells.append(("…" + t[-48:] if len(t) > 48 else t) + mark)
        lines.append(f"| {q} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def methods_legend(methods, skipped: dict) -> str:
    out = [f"* {m}: {METHOD_HELP[m]}" for m in methods]
    out += [f"* {m}: skipped ({why})" for m, why in skipped.items()]
    return "\n".join(out)


def write_json(path, info: dict, store: dict, rows: List[dict], answers: List[Answer]) -> None:
    doc = {"info": info, "store": store, "summary": rows,
           "answers": [{k: v for k, v in a.__dict__.items() if k != "first_logits"} for a in answers]}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def plot(path, rows: List[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.barh(names, [r["ttft_ms"] for r in rows], color="tab:blue")
    a1.set_xlabel("time to first token, ms (mean)")
    a1.invert_yaxis()
    kl = [r["kl_vs_full"] or 0.0 for r in rows]
    a2.barh(names, kl, color="tab:orange")
    a2.set_xlabel("KL vs full prefill, nats (mean; lower is closer)")
    a2.invert_yaxis()
    a2.set_yticklabels([])
    for i, r in enumerate(rows):
        if r["correct"] is not None:
            a2.text(kl[i], i, f"  {r['correct']}/{r['graded']} correct", va="center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
