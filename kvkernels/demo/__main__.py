"""``python -m kvkernels.demo``: knowledge delivered as stored KV caches vs as prompt text.

Prefills each passage of the bundled knowledge base once into a compressed on-disk store, then
answers each question from the stored KV (decoded; reused or blended) and, for reference, with
the passages as text (full prefill) and with plain reuse of the uncompressed KV. Prints time to
first token, tokens prefilled, bytes read from the store, KL divergence of the first-token
distribution from full prefill, and answers with accuracy.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import torch


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m kvkernels.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--kb", default=None, help="knowledge base JSON (default: kvkernels/data/kb/kb.json)")
    p.add_argument("--questions", type=int, default=4, help="first N questions (default 4 of 8; 0: all)")
    p.add_argument("--preset", default="default", help="codec preset (kvkernels.codec presets)")
    p.add_argument("--compression", default="codec", choices=["codec", "standin"],
                   help="codec: kvkernels.codec (default); standin: kvkernels.quantize codes without "
                        "entropy coding (a labelled comparison option, not the codec)")
    p.add_argument("--ratio", type=float, default=0.15, help="blend: fraction of passage tokens recomputed")
    p.add_argument("--model-shape", default="smollm2", choices=["smollm2", "llama3-8b", "tiny-random"],
                   help="llama3-8b: Llama-3-8B's shape with random weights (GPU; timing only)")
    p.add_argument("--passage-tokens", type=int, default=None,
                   help="tile each passage to N tokens (timing; default: the passages as written, "
                        "2048 with --model-shape llama3-8b, the scale where reuse matters)")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--store", default=None, help="store directory (default: a temporary one, removed after)")
    p.add_argument("--max-store-bytes", type=int, default=None)
    p.add_argument("--methods", default=None, help="comma list (default: all available)")
    p.add_argument("--json", default=None, metavar="FILE")
    p.add_argument("--plot", default=None, metavar="FILE.png")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


_MODELS = {}
# Llama shapes with random weights (timing; answers meaningless). tiny-random: a CPU check of the path.
RANDOM_SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256),
    "tiny-random": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=49152),
}


def load_model(shape: str, device: str):
    """(model, tokenizer, name, real_weights); loaded once per process (eval mode, read-only)."""
    if (shape, device) not in _MODELS:
        _MODELS[shape, device] = _load_model(shape, device)
    return _MODELS[shape, device]


def _load_model(shape: str, device: str):
    from ..eval.ppl import load_smollm2

    if shape == "smollm2":
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        model, tok = load_smollm2(device, dtype)
        return model, tok, "SmolLM2-135M-Instruct", True
    if shape == "llama3-8b" and device == "cpu":
        raise SystemExit("--model-shape llama3-8b needs --device cuda (16 GB of bf16 weights)")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ..eval.ppl import gguf_path

    g = gguf_path()
    tok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)  # SmolLM2's ids < Llama-3's vocabulary
    dims = RANDOM_SHAPES[shape]
    cfg = LlamaConfig(**dims, max_position_embeddings=32768, rope_theta=500000.0)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build the weights in their dtype (no fp32 copy of 8B parameters)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    return model, tok, f"{shape}-shape-random-seed0", False


def main(argv=None) -> int:
    args = _parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tqdm import tqdm

    from ..store import LocalKVStore
    from . import report
    from .kb import KnowledgeBase, Tokens
    from .kvio import make_compressor
    from .run import METHODS, Ctx, answer_all, blend_available, paged_reason, store_passages, warm_up

    if args.passage_tokens is None and args.model_shape == "llama3-8b":
        args.passage_tokens = 2048
    t_start = time.perf_counter()
    kb = KnowledgeBase.load(args.kb).subset(args.questions)
    print(f"[load] model {args.model_shape} on {args.device} ...", flush=True)
    model, tok, name, real = load_model(args.model_shape, args.device)
    comp = make_compressor(args.compression, args.preset, name)
    tmp = None
    root = args.store or (tmp := tempfile.mkdtemp(prefix="kvkernels-demo-"))
    store = LocalKVStore(root, max_bytes=args.max_store_bytes, check=comp.verify)
    ctx = Ctx(model, Tokens(tok, kb, args.passage_tokens), kb, store, comp, name, torch.device(args.device),
              max_new_tokens=args.max_new_tokens, ratio=args.ratio, real_weights=real)
    no_paged = paged_reason(ctx.device)
    ctx.paged = no_paged is None
    print("[paged] " + (no_paged or "decoded KV delivered through a paged cache (kvkernels.scatter -> "
                        "PagedLayout.vllm_flash, block 16 -> kvkernels.gather) before reuse/blend"), flush=True)

    skipped = {}
    why = blend_available()
    if why:
        skipped["stored KV + blend"] = why
    methods = [m for m in METHODS if m not in skipped]
    if args.methods:
        want = [m.strip() for m in args.methods.split(",")]
        bad = [m for m in want if m not in METHODS]
        if bad:
            raise SystemExit(f"--methods: unknown {bad}; choose from {list(METHODS)}")
        methods = [m for m in METHODS if m in want and m not in skipped]
    if methods and methods[0] != "full prefill":
        methods = ["full prefill"] + methods  # the reference for KL

    hide = args.no_progress
    with tqdm(total=len(kb.passages) + 1, desc="(1) prefill passages -> store", disable=hide) as bar:
        st = store_passages(ctx, bar)
    warm_up(ctx, methods)
    with tqdm(total=len(kb.questions) * len(methods), desc="(2,3) answer questions", disable=hide) as bar:
        answers = answer_all(ctx, methods, bar)
    rows = report.summarize(answers, methods)
    s = store.stats()

    dev = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    info = {"model": name, "device": dev, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "torch": torch.__version__, "compression": comp.label, "ratio": args.ratio,
            "questions": len(kb.questions), "passages": len(kb.passages),
            "paged_delivery": no_paged or "on", "seconds": time.perf_counter() - t_start}
    print()
    print(f"model {name} | device {dev} | {info['dtype']} | torch {torch.__version__}")
    print(f"(1) stored {st['entries']} entries ({st['tokens']} tokens: prefix + {len(kb.passages)} passages) as "
          f"{report._bytes(st['stored_bytes'])}, vs {report._bytes(st['fp16_bytes'])} in fp16 "
          f"({st['ratio_vs_fp16']:.2f}x smaller); compression: {comp.label}")
    print(f"    store {root}: {s.entries} entries, {report._bytes(s.bytes)} on disk, hit rate {s.hit_rate:.0%} "
          f"({s.hits} hits, {s.misses} misses, {s.corrupt} corrupt)")
    print("    paged delivery: " + (no_paged or "on (scatter into a vLLM flash-attn paged cache, gather back)"))
    print(f"(2,3) {len(kb.questions)} questions, greedy answers of up to {args.max_new_tokens} tokens\n")
    print(report.table(rows))
    print()
    print(report.methods_legend(methods, skipped))
    print()
    print(report.answers_table(answers, methods))
    print(f"\n{info['seconds']:.0f} s in all. TTFT = from the question to its first token's logits "
          "(store read + decode + prefill of what is left); KL of the first-token distribution.")
    if args.json:
        report.write_json(args.json, info, st, rows, answers)
        print(f"wrote {args.json}")
    if args.plot:
        report.plot(args.plot, rows, f"{name} on {dev}, {len(kb.questions)} questions; {comp.label}")
        print(f"wrote {args.plot}")
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
