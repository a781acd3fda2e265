"""Quality of blended KV caches (selective recompute) on a small multi-document task.

Passages of a novel (each prefilled alone, one fact inserted in each) are blended behind each
other and followed by a question and its gold answer. For every answer token, the next-token
distribution of the blend is compared with full prefill of the same text: KL(full || blend),
top-1 agreement, and the gold answer's log-probability. Methods at matched fractions of
recomputed context tokens: plain reuse, deviation-ranked (K and V, layer 1), random, CacheBlend's
rule (layer 1, V only, no sinks), the first k tokens of every chunk but the first (sinks) alone,
and sinks plus ranked.

    python -m kvkernels.eval.blend_quality [--out docs/] [--texts pride,persuasion] [--questions N]
"""
from __future__ import annotations

import argparse
import datetime
import re
import time
from pathlib import Path
from typing import Dict, List

import torch

DATA = Path(__file__).resolve().parent.parent / "data"
TEXTS = {"pride": DATA / "pride_prejudice_excerpt.txt", "persuasion": DATA / "blend_persuasion_excerpt.txt"}

# per text: one fact per passage (inserted in its middle) and questions (answer, passages needed)
FACTS = {
    "pride": [
        "The key to the old library was hidden under the blue vase in the hall.",
        "Colonel Forster's regiment was stationed that summer in the town of Brighton.",
        "Mr. Bennet's favourite horse was a grey mare named Clementine.",
        "Lydia travelled by coach to the town where Colonel Forster's regiment was stationed.",
    ],
    "persuasion": [
        "Sir Walter kept the family silver locked in a cedar chest in the attic.",
        "Captain Wentworth's ship was named the Laconia.",
        "Anne Elliot's favourite flower was the white camellia.",
        "Mary sailed to Lisbon on the ship that Captain Wentworth commanded.",
    ],
}
QUESTIONS = {
    "pride": [
        ("Where was the key to the old library hidden?", " under the blue vase in the hall", 1),
        ("What was the name of Mr. Bennet's favourite horse?", " Clementine", 1),
        ("Where was Colonel Forster's regiment stationed?", " in the town of Brighton", 1),
        ("To which town did Lydia travel?", " Brighton", 2),
    ],
    "persuasion": [
        ("Where did Sir Walter keep the family silver?", " in a cedar chest in the attic", 1),
        ("What was Anne Elliot's favourite flower?", " the white camellia", 1),
        ("What was the name of Captain Wentworth's ship?", " the Laconia", 1),
        ("On which ship did Mary sail to Lisbon?", " the Laconia", 2),
    ],
}


def build_passages(tok, text_key: str, n_passages: int = 4, sentences: int = 3) -> List[List[int]]:
    """Token ids of ``n_passages`` passages: ``sentences`` consecutive sentences of the text each
    (passages apart from each other), with the text's fact inserted after the first sentence."""
    text = re.sub(r"\s+", " ", Path(TEXTS[text_key]).read_text(encoding="utf-8")).strip()
    sents = re.split(r"(?<=[.!?])\s+", text)
    sents = [s for s in sents if 6 <= len(s.split()) <= 45]
    step = max(sentences + 1, len(sents) // n_passages)
    out = []
    for i in range(n_passages):
        grp = sents[i * step:i * step + sentences]
        grp.insert(1, FACTS[text_key][i])
        out.append(tok(" " + " ".join(grp), add_special_tokens=False).input_ids)
    return out


def methods(first_k: int, sink_frac: float) -> List[dict]:
    """(label, blend kwargs) rows; ``sink_frac`` is the fraction the sinks alone recompute."""
    rows = [dict(label="plain reuse", ratio=0.0, first_k=0)]
    for r in (0.05, 0.10, 0.15, 0.30):
        rows.append(dict(label=f"ranked K+V {int(r * 100)}%", ratio=r, first_k=0))
        rows.append(dict(label=f"random {int(r * 100)}%", ratio=r, first_k=0, selection="random"))
        rows.append(dict(label=f"CacheBlend rule (layer 1, V) {int(r * 100)}%", ratio=r, first_k=0, deviation_on="v"))
    rows.append(dict(label=f"first {first_k} per chunk (sinks)", ratio=0.0, first_k=first_k))
    rows.append(dict(label=f"ranked K+V at the sinks' fraction ({sink_frac:.0%})", ratio=sink_frac, first_k=0))
    rows.append(dict(label=f"CacheBlend rule at the sinks' fraction ({sink_frac:.0%})", ratio=sink_frac, first_k=0,
                     deviation_on="v"))
    for r in (0.15, 0.30):
        if r > sink_frac:
            rows.append(dict(label=f"sinks {first_k} + ranked K+V, {int(r * 100)}% in all", ratio=r, first_k=first_k))
    rows.append(dict(label=f"sinks {first_k} + ranked K+V, {sink_frac:.0%} + 15% ", ratio=min(1.0, sink_frac + 0.15),
                     first_k=first_k))
    return rows


def union_methods(first_k: int, sink_frac: float) -> List[dict]:
    """``--study union``: half of the budget by K's ranking, half by V's (compare with the rule
    and ranked K+V rows of the selection study)."""
    return [dict(label=f"K half + V half (union) {int(r * 100)}%", ratio=r, first_k=0, deviation_on="kv_union")
            for r in (0.10, 0.15, 0.30)]


def budget_methods(first_k: int, sink_frac: float) -> List[dict]:
    """``--study budget``: the budget-dependent rule (K's ranking up to 15% of the context, V's
    after) against K and V alone at 20% and 30% (at <= 15% it is K's selection)."""
    rows = []
    for r in (0.20, 0.30):
        p = f"{int(r * 100)}%"
        rows += [dict(label=f"K to 15%, then V {p}", ratio=r, first_k=0, deviation_on="kv_budget"),
                 dict(label=f"CacheBlend rule (layer 1, V) {p}", ratio=r, first_k=0, deviation_on="v"),
                 dict(label=f"ranked K {p}", ratio=r, first_k=0, deviation_on="k")]
    return rows


def study_methods(first_k: int, sink_frac: float) -> List[dict]:
    """The selection study (``--study``): at 10/15/30% recomputed, CacheBlend's rule against
    variants of the deviation (K, K+V, K+V each normalised by its mean), narrowing across layers
    (twice the budget selected at layer 1, half of it kept from layer 2 on: the final fraction
    is the budget, layer 2 pays for 2x) and a later check layer (layers 0-2 in full)."""
    rows = [dict(label="plain reuse", ratio=0.0, first_k=0)]
    for r in (0.10, 0.15, 0.30):
        p = f"{int(r * 100)}%"
        rows += [dict(label=f"CacheBlend rule (layer 1, V) {p}", ratio=r, first_k=0, deviation_on="v"),
                 dict(label=f"ranked K+V {p}", ratio=r, first_k=0, deviation_on="kv"),
                 dict(label=f"ranked K {p}", ratio=r, first_k=0, deviation_on="k"),
                 dict(label=f"ranked K+V normalised {p}", ratio=r, first_k=0, deviation_on="kv_norm"),
                 dict(label=f"V, 2x at layer 1 narrowed to {p} at layer 2", ratio=min(1.0, 2 * r), first_k=0,
                      deviation_on="v", narrow=[(2, 0.5)]),
                 dict(label=f"K+V normalised, 2x narrowed to {p} at layer 2", ratio=min(1.0, 2 * r), first_k=0,
                      deviation_on="kv_norm", narrow=[(2, 0.5)]),
                 dict(label=f"V at layer 2 (layers 0-2 in full) {p}", ratio=r, first_k=0, deviation_on="v",
                      check_layer=2)]
    return rows


@torch.no_grad()
def answer_metrics(full_logits: torch.Tensor, blend_logits: torch.Tensor, answer: torch.Tensor) -> Dict[str, float]:
    """Over the answer tokens: mean KL(full || blend), top-1 agreement, gold log-prob (blend, full)."""
    lf = full_logits.float().log_softmax(-1)
    lb = blend_logits.float().log_softmax(-1)
    kl = (lf.exp() * (lf - lb)).sum(-1)
    return dict(kl=float(kl.mean()), top1=float((lf.argmax(-1) == lb.argmax(-1)).float().mean()),
                gold_lp=float(lb.gather(-1, answer[:, None]).sum()), gold_lp_full=float(lf.gather(-1, answer[:, None]).sum()))


def evaluate(model, tok, text_key: str, first_k: int = 16, n_questions: int = None, seed: int = 0,
             study: str = "") -> dict:
    from kvkernels.blend import Blender

    b = Blender(model)
    dev = b.device
    passages = build_passages(tok, text_key)
    chunks = [b.prefill(torch.tensor(p)) for p in passages]
    n_ctx = sum(len(p) for p in passages)
    sink_frac = sum(min(first_k, len(p)) for p in passages[1:]) / n_ctx
    rows = {"": methods, "selection": study_methods, "union": union_methods,
            "budget": budget_methods}[study](first_k, sink_frac)
    agg = {m["label"]: dict(kl=[], top1=[], gold_lp=[], frac=[]) for m in rows}
    full_gold = []
    qs = QUESTIONS[text_key][:n_questions] if n_questions else QUESTIONS[text_key]
    for qi, (question, answer, _) in enumerate(qs):
        q_ids = tok(f" Question: {question} Answer:", add_special_tokens=False).input_ids
        a_ids = tok(answer, add_special_tokens=False).input_ids
        query = torch.tensor(q_ids + a_ids, device=dev)
        full = torch.tensor(sum(passages, []) + q_ids + a_ids, device=dev)
        logits = model(full[None]).logits[0].float()
        A = len(a_ids)
        full_l = logits[-A - 1:-1]
        ans = torch.tensor(a_ids, device=dev)
        for m in rows:
            kw = {k: v for k, v in m.items() if k != "label"}
            if kw.get("selection") == "random":
                kw["seed"] = seed + qi
            r = b.blend(chunks, query, **kw)
            ql = r.extra["query_logits"][-A - 1:-1]
            met = answer_metrics(full_l, ql, ans)
            a = agg[m["label"]]
            a["kl"].append(met["kl"]), a["top1"].append(met["top1"]), a["gold_lp"].append(met["gold_lp"])
            a["frac"].append(r.recomputed_fraction)
        full_gold.append(met["gold_lp_full"])
    mean = lambda v: sum(v) / len(v)
    table = [dict(label=k, kl=mean(v["kl"]), top1=mean(v["top1"]), gold_lp=mean(v["gold_lp"]), frac=mean(v["frac"]))
             for k, v in agg.items()]
    return dict(text=text_key, passages=[len(p) for p in passages], n_questions=len(qs), rows=table,
                full_gold_lp=mean(full_gold), sink_frac=sink_frac, first_k=first_k)


def markdown(res: dict) -> str:
    lines = [f"### {res['text']}: {len(res['passages'])} passages of {res['passages']} tokens, "
             f"{res['n_questions']} questions (one needs two passages)", "",
             "| method | recomputed (of context) | KL(full ‖ blend) | top-1 agreement | gold log-prob |",
             "|---|---:|---:|---:|---:|",
             f"| full prefill | 100% | 0 | 100% | {res['full_gold_lp']:.2f} |"]
    for r in res["rows"]:
        lines.append(f"| {r['label']} | {r['frac']:.1%} | {r['kl']:.4f} | {r['top1']:.0%} | {r['gold_lp']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvkernels.eval.blend_quality", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder for blend-quality.md")
    ap.add_argument("--texts", default="pride,persuasion")
    ap.add_argument("--questions", type=int, default=None)
    ap.add_argument("--first-k", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--study", default="", choices=["", "selection", "union", "budget"],
                    help="a study (study_methods / union_methods) instead of the report")
    args = ap.parse_args(argv)
    from kvkernels.eval.ppl import GGUF_NAME, _cpu_name, load_smollm2

    t0 = time.perf_counter()
    model, tok = load_smollm2(args.device, torch.float32)
    parts = []
    for t in args.texts.split(","):
        res = evaluate(model, tok, t, first_k=args.first_k, n_questions=args.questions, study=args.study)
        parts.append(markdown(res))
        print(parts[-1], flush=True)
    dev = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else _cpu_name()
    head = ("# Blend quality (selective recompute)\n\n"
            f"SmolLM2-135M-Instruct ({GGUF_NAME}, float32), {dev}, torch {torch.__version__}, "
            f"{datetime.date.today().isoformat()}, {time.perf_counter() - t0:.0f} s. Generated by "
            "`python -m kvkernels.eval.blend_quality --out docs/`.\n\n"
            "Each passage is prefilled alone (positions from 0), blended in order (keys re-rotated), followed by "
            "` Question: ... Answer:` and the gold answer, all computed. Metrics are means over the answer tokens "
            "(teacher-forced) and the questions; KL and top-1 are against full prefill of the same tokens. "
            "The first passage is exact and never recomputed; `recomputed` is the fraction of all passage tokens "
            "recomputed (budgets include the sinks). Ranked selection uses the squared deviation of K and V at "
            "layer 1 (layers 0 and 1 run in full: their fresh K/V are written back for every token); CacheBlend's "
            "rule uses V only and no sinks. Every recomputed token attends to the keys at positions <= its own.\n")
    doc = head + "\n" + "\n\n".join(parts) + "\n"
    if args.out and not args.study:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "blend-quality.md").write_text(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
