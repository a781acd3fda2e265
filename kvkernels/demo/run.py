"""The run's steps, one function each, over the public API (see the package docstring)."""
from __future__ import annotations

import dataclasses
import importlib.util
import time
from typing import Dict, List, Optional

import torch

from ..store import KVStore, store_key
from .kb import KnowledgeBase, Question, Tokens
from .kvio import Compressor, cache_to_flat, flat_to_cache, rope_inv_freq, shift_keys

METHODS = ("full prefill", "KV reuse", "stored KV reuse", "stored KV + blend")
METHOD_HELP = {
    "full prefill": "passages as text in the prompt: every token prefilled (the reference)",
    "KV reuse": "each passage's uncompressed KV, prefilled alone, concatenated (RoPE shifted), no recompute",
    "stored KV reuse": "the same from the store: read, verify, decode, concatenate",
    "stored KV + blend": "from the store, blended: a fraction of the passages' tokens recomputed (CacheBlend)",
}


@dataclasses.dataclass
class Ctx:
    model: object
    tokens: Tokens
    kb: KnowledgeBase
    store: KVStore
    comp: Compressor
    model_name: str
    device: torch.device
    max_new_tokens: int = 20
    ratio: float = 0.15
    real_weights: bool = True
    paged: bool = False  # deliver decoded KV through a paged cache (kvkernels.scatter/gather; CUDA)
    plain_kv: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # uncompressed, for "KV reuse"
    prefix_kv: Optional[torch.Tensor] = None


@dataclasses.dataclass
class Answer:
    question: str
    method: str
    text: str
    correct: Optional[bool]
    ttft_s: float
    prefilled: int
    bytes_read: int
    kl: Optional[float] = None
    first_logits: Optional[torch.Tensor] = dataclasses.field(default=None, repr=False)
    recomputed_fraction: Optional[float] = None


def _cache_kw(model) -> str:
    """The forward's name for the cache argument (transformers >= 5.2x: ``cache``)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _out_cache(out):
    c = getattr(out, "cache", None)
    return c if c is not None else out.past_key_values


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def blend_available() -> Optional[str]:
    """None if kvkernels.blend's Blender can be used, else the reason."""
    if importlib.util.find_spec("kvkernels.blend") is None:
        return "kvkernels.blend is not on this branch yet"
    try:
        from kvkernels.blend import Blender  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the merge
        return f"kvkernels.blend.Blender not importable: {e}"
    return None


@torch.no_grad()
def prefill_kv(model, ids: List[int], prefix: List[int]) -> torch.Tensor:
    """Flat KV ``[2, L, T, H, D]`` of ``ids`` prefilled after ``prefix`` (positions
    len(prefix)..), the prefix's own KV dropped."""
    dev = next(model.parameters()).device
    out = model(torch.tensor([prefix + ids], device=dev), use_cache=True)
    return cache_to_flat(_out_cache(out), start=len(prefix))


def _key(ctx: Ctx, ids: List[int]) -> str:
    return store_key(ctx.model_name, ctx.comp.name, ids)


# -- step 1 ----------------------------------------------------------------------------------------
@torch.no_grad()
def store_passages(ctx: Ctx, progress=None) -> dict:
    """Prefill the prefix and each passage once (each passage after the prefix, on its own) and
    put the compressed KV in the store under ``store_key(model, compressor, prefix + passage)``.
    Entries already in the store (and passing their checks) are kept. Returns sizes."""
    model, tk = ctx.model, ctx.tokens
    ctx.prefix_kv = prefill_kv(model, tk.prefix, [])
    items = [("prefix", [], tk.prefix)] + [(pid, tk.prefix, ids) for pid, ids in tk.passages.items()]
    stored = fp16 = tokens = reused = 0
    t0 = time.perf_counter()
    for name, before, ids in items:
        key = _key(ctx, before + ids)
        kv = ctx.prefix_kv if name == "prefix" else prefill_kv(model, ids, before)
        if name != "prefix":
            ctx.plain_kv[name] = kv
        blob = ctx.store.get(key, None, on_corrupt="miss") if ctx.store.contains(key) else None
        if blob is None:
            blob = ctx.comp.encode(kv)
            ctx.store.put(key, blob)
        else:
            reused += 1
        stored += len(blob)
        fp16 += kv.numel() * 2
        tokens += len(ids)
        if progress:
            progress.update(1)
    return {"entries": len(items), "tokens": tokens, "stored_bytes": stored, "fp16_bytes": fp16,
            "ratio_vs_fp16": fp16 / max(stored, 1), "already_stored": reused, "seconds": time.perf_counter() - t0,
            "compression": ctx.comp.label}


# -- shared: generation from a cache ------------------------------------------------------------
@torch.no_grad()
def _greedy(ctx: Ctx, cache, logits: torch.Tensor) -> str:
    """Greedy continuation from ``cache`` whose last position gave ``logits`` [V]."""
    tok = ctx.tokens.tok
    eos = {tok.eos_token_id, *(tok.convert_tokens_to_ids(t) for t in ("<|im_end|>",))} - {None}
    out = []
    nxt = int(logits.argmax())
    for _ in range(ctx.max_new_tokens):
        if nxt in eos:
            break
        out.append(nxt)
        r = ctx.model(torch.tensor([[nxt]], device=ctx.device), use_cache=True, **{_cache_kw(ctx.model): cache})
        cache = _out_cache(r)
        nxt = int(r.logits[0, -1].argmax())
    return tok.decode(out, skip_special_tokens=True).strip()


def _answer(ctx, q, method, cache, logits, t0, prefilled, nbytes, frac=None) -> Answer:
    _sync(ctx.device)
    ttft = time.perf_counter() - t0
    text = _greedy(ctx, cache, logits)
    return Answer(q.question, method, text, q.correct(text) if ctx.real_weights else None, ttft, prefilled, nbytes,
                  first_logits=logits.float().cpu(), recomputed_fraction=frac)


# -- step 3 (reference) ------------------------------------------------------------------------------
@torch.no_grad()
def answer_full_prefill(ctx: Ctx, q: Question) -> Answer:
    """The passages as text: the whole prompt prefilled."""
    ids = ctx.tokens.full(q)
    _sync(ctx.device)
    t0 = time.perf_counter()
    out = ctx.model(torch.tensor([ids], device=ctx.device), use_cache=True)
    return _answer(ctx, q, "full prefill", _out_cache(out), out.logits[0, -1], t0, len(ids), 0)


def _assemble(ctx: Ctx, q: Question, kvs: List[torch.Tensor]) -> torch.Tensor:
    """prefix KV + each passage's KV with its keys moved from position len(prefix).. to its place."""
    inv = rope_inv_freq(ctx.model)
    P = len(ctx.tokens.prefix)
    parts, pos = [ctx.prefix_kv.to(ctx.device)], P
    for kv in kvs:
        kv = kv.to(ctx.device)
        parts.append(torch.stack([shift_keys(kv[0], pos - P, inv), kv[1]]))
        pos += kv.shape[2]
    return torch.cat(parts, dim=2)


@torch.no_grad()
def _reuse(ctx: Ctx, q: Question, kvs, method, t0, nbytes, extra_prefilled=0) -> Answer:
    kv = _assemble(ctx, q, kvs)
    suffix = ctx.tokens.suffix(q)
    cache = flat_to_cache(kv.to(next(ctx.model.parameters()).dtype), ctx.model.config)
    out = ctx.model(torch.tensor([suffix], device=ctx.device), use_cache=True, **{_cache_kw(ctx.model): cache})
    return _answer(ctx, q, method, _out_cache(out), out.logits[0, -1], t0, len(suffix) + extra_prefilled, nbytes)


@torch.no_grad()
def answer_kv_reuse(ctx: Ctx, q: Question) -> Answer:
    """Plain KV reuse of the uncompressed per-passage caches (in memory): no recompute."""
    _sync(ctx.device)
    t0 = time.perf_counter()
    return _reuse(ctx, q, [ctx.plain_kv[p] for p in q.passages], "KV reuse", t0, 0)


# -- step 2 ----------------------------------------------------------------------------------------
def load_passages(ctx: Ctx, q: Question):
    """The question's passages' KV from the store: read (checked), decoded on the device.
    A missing or corrupt entry (quarantined by the store) is a miss: that passage is prefilled
    again and put back. Returns (list of flat KV, bytes read, tokens prefilled for misses)."""
    kvs, nbytes, prefilled = [], 0, 0
    dtype = next(ctx.model.parameters()).dtype
    for p in q.passages:
        ids = ctx.tokens.passages[p]
        key = _key(ctx, ctx.tokens.prefix + ids)
        blob = ctx.store.get(key, None, on_corrupt="miss")
        if blob is None:  # fall back to prefill
            kv = prefill_kv(ctx.model, ids, ctx.tokens.prefix)
            prefilled += len(ids)
            ctx.store.put(key, ctx.comp.encode(kv))
            kvs.append(kv.to(dtype))
            continue
        nbytes += len(blob)
        kvs.append(ctx.comp.decode(blob, device=ctx.device, dtype=dtype))
    if ctx.paged:
        kvs = deliver_paged(ctx, kvs)
    return kvs, nbytes, prefilled


PAGE_TOKENS = 16  # block size of the demo's paged cache (vLLM's default)


def paged_reason(device: torch.device) -> Optional[str]:
    """None when the decoded KV goes through a paged cache on this device, else why not."""
    if device.type != "cuda":
        return "paged delivery (kvkernels.scatter/gather) skipped on CPU: the CUDA path only"
    return None


@torch.no_grad()
def deliver_paged(ctx: Ctx, kvs: List[torch.Tensor]) -> List[torch.Tensor]:
    """CUDA only: scatter each decoded passage's KV ``[2, L, T, H, D]`` into a vLLM flash-attn
    style paged cache (per layer ``[2, NB, BS, H, D]``, ``PagedLayout.vllm_flash(kv_dim=0)``)
    at scattered blocks, then gather it back by the same slot mapping -- the delivery a serving
    engine would do, done here so the timed path includes it. Returns the gathered KV."""
    import kvkernels
    from kvkernels import PagedLayout

    _, L, _, H, D = kvs[0].shape
    total = sum(kv.shape[2] for kv in kvs)
    nb_needed = sum(-(-kv.shape[2] // PAGE_TOKENS) for kv in kvs)
    pc = getattr(ctx, "_paged", None)
    if pc is None or pc["nb"] < 2 * nb_needed or pc["dtype"] != kvs[0].dtype:
        nb = max(2 * nb_needed, 64)
        caches = [torch.zeros(2, nb, PAGE_TOKENS, H, D, dtype=kvs[0].dtype, device=ctx.device) for _ in range(L)]
        pc = {"nb": nb, "dtype": kvs[0].dtype, "caches": caches,
              "layout": PagedLayout.vllm_flash(caches, kv_dim=0)}
        ctx._paged = pc
    # blocks in a shuffled order (as an engine's free list would hand them out), each passage
    # starting on a fresh block
    g = torch.Generator().manual_seed(total)
    blocks = torch.randperm(pc["nb"], generator=g)[:nb_needed]
    out, bi = [], 0
    for kv in kvs:
        T = kv.shape[2]
        nblk = -(-T // PAGE_TOKENS)
        t = torch.arange(T)
        slots = (blocks[bi + t // PAGE_TOKENS] * PAGE_TOKENS + t % PAGE_TOKENS).to(ctx.device)
        bi += nblk
        kvkernels.scatter(kv.contiguous(), pc["layout"], slots)
        out.append(kvkernels.gather(pc["layout"], slots, dtype=kv.dtype))
    return out


@torch.no_grad()
def answer_from_store(ctx: Ctx, q: Question, blend: bool) -> Answer:
    """Stored KV: load + decode, then plain reuse or (``blend``) ``Blender.blend`` with
    ``ctx.ratio`` of the passages' tokens recomputed."""
    _sync(ctx.device)
    t0 = time.perf_counter()
    kvs, nbytes, missed = load_passages(ctx, q)
    if not blend:
        return _reuse(ctx, q, kvs, "stored KV reuse", t0, nbytes, missed)
    from kvkernels.blend import Blender, ChunkCache

    blender = getattr(ctx, "_blender", None) or Blender(ctx.model)
    ctx._blender = blender
    P, chunks = len(ctx.tokens.prefix), []
    prefix = torch.tensor(ctx.tokens.prefix, device=ctx.device)
    for p, kv in zip(q.passages, kvs):  # each stored chunk was prefilled at positions P.. behind the prefix
        ids = ctx.tokens.passages[p]
        chunks.append(ChunkCache(kv=kv, positions=torch.arange(P, P + len(ids), device=ctx.device),
                                 input_ids=torch.tensor(ids, device=ctx.device)))
        # prefix_ids left None on purpose: a chunk marked as computed behind the same prefix at its
        # own positions is kept as exact by the blender (never recomputed), but these are decoded
        # (lossy) caches, so every chunk's tokens must be candidates for recompute.
    suffix = ctx.tokens.suffix(q)
    res = blender.blend(chunks, torch.tensor(suffix, device=ctx.device), ratio=ctx.ratio, prefix_ids=prefix)
    # res.cache holds every token but the last (for model.generate, which recomputes the last one);
    # our greedy loop continues from the logits of the last position, so it needs the full KV (res.kv).
    cache = flat_to_cache(res.kv.to(next(ctx.model.parameters()).dtype), ctx.model.config)
    return _answer(ctx, q, "stored KV + blend", cache, res.logits[0], t0,
                   len(suffix) + int(res.n_recomputed) + missed,
                   nbytes, frac=float(res.recomputed_fraction))


def kl_div(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """KL(p || q) in nats of the next-token distributions of two logit vectors."""
    lp, lq = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum())


def _method_fns():
    return {"full prefill": answer_full_prefill, "KV reuse": answer_kv_reuse,
            "stored KV reuse": lambda c, q: answer_from_store(c, q, blend=False),
            "stored KV + blend": lambda c, q: answer_from_store(c, q, blend=True)}


def answer_all(ctx: Ctx, methods, progress=None) -> List[Answer]:
    """Every question by every method; KL of each first-token distribution vs full prefill."""
    fns = _method_fns()
    answers = []
    for q in ctx.kb.questions:
        ref = None
        for m in methods:
            a = fns[m](ctx, q)
            if m == "full prefill":
                ref = a.first_logits
            if ref is not None:
                a.kl = kl_div(ref, a.first_logits)
            answers.append(a)
            if progress:
                progress.update(1)
    return answers


def warm_up(ctx: Ctx, methods=("full prefill", "KV reuse")) -> None:
    """Untimed passes of each method first (first calls pay one-time costs: kernel compilation,
    allocator growth, cuBLAS heuristics for each new shape). On a GPU every question is run once
    (each has its own sequence lengths); on a CPU the first question only (time matters there and
    the CPU's first calls cost little)."""
    fns = _method_fns()
    qs = ctx.kb.questions if ctx.device.type == "cuda" else ctx.kb.questions[:1]
    for q in qs:
        for m in methods:
            fns[m](ctx, q)
