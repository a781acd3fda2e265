"""End-to-end blend of separately prefilled texts for HF Llama-family models.

``Blender(model).prefill(ids)`` computes a text's KV cache alone (or behind a shared prefix);
``Blender(model).blend(chunks, query_ids)`` places the chunks one after another behind the
prefix, re-rotates their keys to the new positions, and runs the model layer by layer:

* layers ``0 .. check_layer`` run in full over every token that is not exact (layer 0's KV
  depends only on token and position; the check layer's fresh K/V are computed for all tokens
  anyway, so they are all written back);
* at ``check_layer`` the tokens are selected (:func:`kvkernels.select_tokens`: deviation of the
  fresh vs the cached K and/or V, top-k, joined with the forced tokens: the query and the first
  ``first_k`` tokens of every chunk but the first);
* in every later layer only the selected tokens run, batched through the model's own modules,
  attending to all keys through an explicit position mask (a token at position ``p`` sees the
  keys at positions ``<= p``, never later ones); their K/V are written back into the cache.

Exact tokens (never recomputed): the prefix, and the first chunk when it was prefilled behind
the same prefix. The budget: ``round(ratio * n_context)`` recomputed context tokens (``n_context``
= the chunks' tokens; the forced sinks count against it; the query is always computed on top).
``ratio=1.0`` reproduces full prefill; ``ratio=0, first_k=0`` is plain reuse.
"""
from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .ops import cos_sin_cache_from_inv_freq, rerotate_keys, scatter_tokens, select_tokens
from ..reference.blend import topk_mask_into

SUPPORTED = ("llama", "mistral", "qwen2")
ROPE_OK = ("default", "linear", "llama3")


@dataclass
class ChunkCache:
    """One text's KV cache, computed alone (or behind ``prefix_ids``).

    ``kv``: ``[2, L, T, H, D]`` (K post-RoPE at ``positions``, then V) in the model's dtype;
    ``positions``: int64 ``[T]`` (``P + arange(T)`` behind a prefix of ``P`` tokens);
    ``input_ids``: int64 ``[T]``; ``prefix_ids``: the prefix's ids (int64 ``[P]``) or None.
    """
    kv: torch.Tensor
    positions: torch.Tensor
    input_ids: torch.Tensor
    prefix_ids: Optional[torch.Tensor] = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class BlendResult:
    """``cache``: a transformers ``DynamicCache`` holding every token but the last (so that
    ``model.generate(result.input_ids, past_key_values=result.cache)`` continues: generate
    computes the last token itself); ``kv``: the full blended ``[2, L, N, H, D]``;
    ``logits``: float32 ``[1, V]`` of the last position; ``input_ids``: ``[1, N]``;
    ``recomputed``: int64 indices (into the N tokens) of the recomputed context tokens;
    ``n_recomputed`` = their count (the query excluded), ``recomputed_fraction`` = that over the
    chunks' tokens. ``extra``: ``query_logits`` float32 ``[Q, V]`` (every query position),
    ``active_per_layer`` (tokens run per layer), ``prefix_len``, ``chunk_lens``."""
    cache: object
    kv: torch.Tensor
    logits: torch.Tensor
    input_ids: torch.Tensor
    recomputed: torch.Tensor
    n_recomputed: int
    recomputed_fraction: float
    n_context: int
    extra: dict = field(default_factory=dict)


def _ids1d(name, ids, device) -> torch.Tensor:
    if isinstance(ids, (list, tuple, range)):
        ids = torch.tensor(list(ids), dtype=torch.int64)
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor or a list of token ids, got {type(ids).__name__}")
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: expected int token ids of shape [T] or [1, T], got {ids.dtype} {tuple(ids.shape)}")
    return ids.to(device=device, dtype=torch.int64)


class Blender:
    """Blend per-text KV caches for a HF Llama-family causal LM (``LlamaForCausalLM`` and the
    same-shaped Mistral (no sliding window) / Qwen2 models). Raises ``ValueError`` with the
    reason for any other architecture or RoPE variant."""

    def __init__(self, model, *, attn_dtype: Optional[torch.dtype] = None):
        cfg = getattr(model, "config", None)
        mt = getattr(cfg, "model_type", None)
        if mt not in SUPPORTED:
            raise ValueError(f"model: {type(model).__name__} (model_type {mt!r}) is not supported: the blender "
                             f"runs Llama-family decoder layers ({', '.join(SUPPORTED)})")
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
            raise ValueError("model: sliding-window attention is not supported (every token must see every earlier key)")
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb") or not hasattr(model, "lm_head"):
            raise ValueError(f"model: {type(model).__name__} lacks model.layers / rotary_emb / lm_head")
        a0 = inner.layers[0].self_attn
        for nm in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not hasattr(a0, nm):
                raise ValueError(f"model: attention has no {nm}")
        if hasattr(a0, "q_norm") or hasattr(a0, "k_norm"):
            raise ValueError("model: attention with q/k norms (Qwen3-style) is not supported")
        rope = getattr(inner.rotary_emb, "rope_type", "default")
        if rope not in ROPE_OK:
            raise ValueError(f"model: RoPE type {rope!r} is not supported (relative re-rotation is valid for "
                             f"{', '.join(ROPE_OK)}; dynamic NTK rescales with length, YaRN/LongRoPE fold a magnitude)")
        if float(getattr(inner.rotary_emb, "attention_scaling", 1.0)) != 1.0:
            raise ValueError("model: RoPE with an attention scaling factor is not supported")
        self.model, self.inner, self.config = model, inner, cfg
        self.L = cfg.num_hidden_layers
        self.Hq = cfg.num_attention_heads
        self.H = cfg.num_key_value_heads
        self.D = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.Hq
        self.G = self.Hq // self.H
        self.max_pos = int(cfg.max_position_embeddings)
        inv = getattr(inner.rotary_emb, "original_inv_freq", None)
        if inv is None:
            inv = inner.rotary_emb.inv_freq
        self.cos_sin = cos_sin_cache_from_inv_freq(inv.float(), self.max_pos)  # [max_pos, D] fp32
        self._prefix_cache = {}

    # ---- helpers ----------------------------------------------------------------------------
    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def _full_kv(self, ids: torch.Tensor) -> torch.Tensor:
        """``[2, L, T, H, D]`` of a plain causal forward over ``ids`` ``[T]`` at positions 0..T-1."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        self.model(input_ids=ids[None], past_key_values=cache, use_cache=True, logits_to_keep=1)
        ks = torch.stack([cache.layers[i].keys[0] for i in range(self.L)])    # [L, H, T, D]
        vs = torch.stack([cache.layers[i].values[0] for i in range(self.L)])
        return torch.stack([ks, vs]).transpose(2, 3).contiguous()              # [2, L, T, H, D]

    def _prefix_kv(self, prefix: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if prefix is None or prefix.numel() == 0:
            return None
        k = tuple(prefix.tolist())
        if k not in self._prefix_cache:
            self._prefix_cache = {k: self._full_kv(prefix)}  # keep one
        return self._prefix_cache[k]

    # ---- public -----------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, input_ids, prefix_ids=None) -> ChunkCache:
        """The KV cache of ``input_ids`` (``[T]`` or ``[1, T]``) computed alone, or behind
        ``prefix_ids`` (its own tokens only are kept, at positions ``P .. P+T-1``)."""
        dev = self.device
        ids = _ids1d("input_ids", input_ids, dev)
        if ids.numel() == 0:
            raise ValueError("input_ids: empty text")
        pre = _ids1d("prefix_ids", prefix_ids, dev) if prefix_ids is not None else None
        P = 0 if pre is None else pre.numel()
        if P + ids.numel() > self.max_pos:
            raise ValueError(f"input_ids: {P + ids.numel()} tokens exceed max_position_embeddings {self.max_pos}")
        full = ids if pre is None else torch.cat([pre, ids])
        kv = self._full_kv(full)[:, :, P:].contiguous()
        return ChunkCache(kv=kv, positions=torch.arange(P, P + ids.numel(), device=dev), input_ids=ids,
                          prefix_ids=None if pre is None or P == 0 else pre)

    def _check_chunk(self, i, c):
        if not isinstance(c, ChunkCache):
            raise TypeError(f"chunks[{i}]: expected a ChunkCache (from Blender.prefill), got {type(c).__name__}")
        kv = c.kv
        want = (2, self.L, c.num_tokens, self.H, self.D)
        if not isinstance(kv, torch.Tensor) or kv.dim() != 5:
            raise ValueError(f"chunks[{i}].kv: expected a [2, L, T, H, D] tensor")
        if kv.shape[1] != self.L or kv.shape[3] != self.H or kv.shape[4] != self.D:
            raise ValueError(f"chunks[{i}].kv: shape {tuple(kv.shape)} does not fit the model "
                             f"(L={self.L}, kv heads={self.H}, head_dim={self.D})")
        if tuple(kv.shape) != want:
            raise ValueError(f"chunks[{i}].kv: has {kv.shape[2]} tokens but its input_ids {c.num_tokens}")
        if c.positions.shape != (c.num_tokens,):
            raise ValueError(f"chunks[{i}].positions: expected shape [{c.num_tokens}], got {tuple(c.positions.shape)}")

    @torch.no_grad()
    def blend(self, chunks: Sequence[ChunkCache], query_ids, *, ratio: float = 0.15, first_k: int = 16,
              selection: Union[str, Sequence[int], torch.Tensor] = "ranked", prefix_ids=None,
              check_layer: int = 1, deviation_on: str = "kv", narrow: Sequence = (), seed: int = 0) -> BlendResult:
        """Blend ``chunks`` (in order) behind ``prefix_ids``, followed by ``query_ids``.

        Args:
            chunks: :class:`ChunkCache` s from :meth:`prefill`.
            query_ids: ``[Q]`` or ``[1, Q]`` (Q >= 1), always computed.
            ratio: in [0, 1]: the recompute budget as a fraction of the chunks' tokens (sinks included).
            first_k: the first ``first_k`` tokens of every chunk but the first are always recomputed.
            selection: ``"ranked"`` (by KV deviation at ``check_layer``), ``"random"`` (seeded by
                ``seed``), or explicit indices into the blended sequence (prefix + chunks + query)
                of the context tokens to recompute (``ratio`` and ``first_k`` then ignored).
            prefix_ids: shared prefix (system prompt / BOS) placed first, computed exactly.
            check_layer: the layer whose deviation selects (>= 1; layers up to it run in full).
            deviation_on: ``"k"``, ``"v"``, ``"kv"`` (the sum of both squared deviations) or
                ``"kv_norm"`` (each divided by its mean over the candidates first, so that K, whose
                deviations are larger, does not drown V's) or ``"kv_union"`` (half of the budget
                by K's ranking, the rest by V's among the others) or ``"kv_budget"`` (K's ranking
                for up to ``KV_BUDGET_K`` = 15% of the candidates, V's for the rest of a larger
                budget: the selection study's split, docs/blend-quality.md).
            narrow: ``[(layer, fraction), ...]`` increasing layers > check_layer: at each, keep the
                forced tokens and the ``fraction`` of the selected others that deviate most.
        """
        dev, dt = self.device, self.dtype
        if not isinstance(chunks, (list, tuple)) or not chunks:
            raise ValueError("chunks: expected a non-empty list of ChunkCache")
        for i, c in enumerate(chunks):
            self._check_chunk(i, c)
        q = _ids1d("query_ids", query_ids, dev)
        if q.numel() == 0:
            raise ValueError("query_ids: needs at least one token (the position whose logits are returned)")
        if not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) <= 1.0:
            raise ValueError(f"ratio: expected a number in [0, 1], got {ratio!r}")
        if not isinstance(first_k, int) or first_k < 0:
            raise ValueError(f"first_k: expected an int >= 0, got {first_k!r}")
        if not isinstance(check_layer, int) or not 1 <= check_layer < max(self.L, 2):
            raise ValueError(f"check_layer: expected an int in [1, {self.L - 1}], got {check_layer!r}")
        if deviation_on not in DEVIATIONS:
            raise ValueError(f"deviation_on: expected one of {DEVIATIONS}, got {deviation_on!r}")
        explicit = None
        if not isinstance(selection, str):
            explicit = selection
        elif selection not in ("ranked", "random"):
            raise ValueError(f"selection: expected 'ranked', 'random' or indices, got {selection!r}")
        narrow = sorted((int(l), float(f)) for l, f in narrow)
        for l, f in narrow:
            if not check_layer < l < self.L or not 0.0 <= f <= 1.0:
                raise ValueError(f"narrow: ({l}, {f}) needs check_layer < layer < {self.L} and a fraction in [0, 1]")

        pre = _ids1d("prefix_ids", prefix_ids, dev) if prefix_ids is not None else None
        P = 0 if pre is None else pre.numel()
        lens = [c.num_tokens for c in chunks]
        n_ctx = sum(lens)
        Q = q.numel()
        N = P + n_ctx + Q
        if N > self.max_pos:
            raise ValueError(f"chunks: {N} tokens in all exceed max_position_embeddings {self.max_pos}")
        ids = torch.cat(([pre] if P else []) + [c.input_ids.to(dev) for c in chunks] + [q])
        pos = torch.arange(N, device=dev)

        # ---- combined cache [L, H, N, D] (K re-rotated), per-token flags (host side) -------------
        K = torch.zeros(self.L, self.H, N, self.D, dtype=dt, device=dev)
        V = torch.zeros_like(K)
        pkv = self._prefix_kv(pre)
        if pkv is not None:
            K[:, :, :P] = pkv[0].transpose(1, 2)
            V[:, :, :P] = pkv[1].transpose(1, 2)
        exact = torch.zeros(N, dtype=torch.bool)
        exact[:P] = True
        sinks = torch.zeros(N, dtype=torch.bool)
        cs = self.cos_sin.to(dev)
        off = P
        for i, c in enumerate(chunks):
            n = c.num_tokens
            K[:, :, off:off + n] = c.kv[0].to(device=dev, dtype=dt).transpose(1, 2)
            V[:, :, off:off + n] = c.kv[1].to(device=dev, dtype=dt).transpose(1, 2)
            same_prefix = (c.prefix_ids is None and P == 0) or (
                c.prefix_ids is not None and P == c.prefix_ids.numel() and torch.equal(c.prefix_ids.to(dev), pre))
            if i == 0 and same_prefix and int(c.positions[0]) == off:
                exact[off:off + n] = True  # kept as is
            else:
                rerotate_keys(K[:, :, off:off + n].transpose(1, 2), c.positions.to(dev), pos[off:off + n], cs,
                              is_neox=True, validate=c.positions.device.type == "cpu")
                sinks[off:off + min(first_k, n)] = True
            off += n
        is_query = torch.zeros(N, dtype=torch.bool)
        is_query[P + n_ctx:] = True
        cand = ~exact & ~is_query  # context tokens that may be recomputed
        n_cand = int(cand.sum())

        forced_ctx = torch.zeros(N, dtype=torch.bool)
        if explicit is not None:
            e = torch.as_tensor(explicit, dtype=torch.int64).flatten().cpu()
            if e.numel() and (int(e.min()) < 0 or int(e.max()) >= N):
                raise ValueError(f"selection: indices must lie in [0, {N})")
            forced_ctx[e] = True
            forced_ctx &= cand
            budget_rank = 0
        else:
            forced_ctx = sinks & cand
            budget = min(int(round(float(ratio) * n_ctx)), n_cand)
            budget_rank = max(0, budget - int(forced_ctx.sum()))
        forced = forced_ctx | is_query

        # active set: non-exact tokens (layers 0 .. check_layer run over all of them)
        act = (~exact).nonzero().flatten().to(dev)
        h = self.inner.embed_tokens(ids[act][None])  # [1, A, hidden]
        layers = self.inner.layers
        nsel_hist = []
        mask, mask_n = None, -1
        for li in range(self.L):
            layer = layers[li]
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            A = act.numel()
            qs = attn.q_proj(x).view(1, A, self.Hq, self.D).transpose(1, 2)
            ks = attn.k_proj(x).view(1, A, self.H, self.D).transpose(1, 2)
            vs = attn.v_proj(x).view(1, A, self.H, self.D).transpose(1, 2)
            cos, sin = self.inner.rotary_emb(x, pos[act][None])
            qs, ks = _apply_rope(qs, ks, cos, sin)
            keep = None
            if li == check_layer and budget_rank + int(forced.sum()) < A:
                keep = self._select(ks[0], vs[0], K[li][:, act], V[li][:, act], act, cand, forced, budget_rank,
                                    selection if explicit is None else "explicit", deviation_on, seed,
                                    k_count=math.ceil(KV_BUDGET_K * n_ctx))
            elif narrow and li == narrow[0][0]:
                f = narrow.pop(0)[1]
                n_free = int((~forced[act.cpu()]).sum())
                keep = self._select(ks[0], vs[0], K[li][:, act], V[li][:, act], act, cand, forced,
                                    int(round(f * n_free)), "ranked", deviation_on, seed)
            # write K/V of every active token, then attend with the active queries
            scatter_tokens([K[li], V[li]], act, [ks[0], vs[0]], dim=1, validate=False)
            if keep is not None:
                act = act[keep]
                qs, h = qs[:, :, keep], h[:, keep]
            nsel_hist.append(act.numel())
            if mask is None or mask_n != act.numel():
                # [G*A, N]: explicit positions, never later keys; GQA as G query rows per KV head
                mask = (pos[None, :] <= pos[act][:, None]).repeat(self.G, 1)
                mask_n = act.numel()
            S = act.numel()
            qg = qs.reshape(1, self.H, self.G * S, self.D)  # q head j -> KV head j // G
            o = F.scaled_dot_product_attention(qg, K[li][None], V[li][None], attn_mask=mask, scale=attn.scaling)
            o = o.reshape(1, self.Hq, S, self.D)
            o = attn.o_proj(o.transpose(1, 2).reshape(1, S, self.Hq * self.D))
            h = h + o
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        # the query's tokens are the last Q active ones (always computed, positions ascending)
        q_logits = self.model.lm_head(self.inner.norm(h[:, -Q:]))[0].float()  # [Q, V]
        logits = q_logits[-1:]

        act_cpu = act.cpu()
        rec = act_cpu[cand[act_cpu]]
        kv = torch.stack([K, V]).transpose(2, 3)  # [2, L, N, H, D] view
        cache = _to_dynamic_cache(self.config, K[:, :, :N - 1], V[:, :, :N - 1])
        return BlendResult(cache=cache, kv=kv, logits=logits, input_ids=ids[None], recomputed=rec,
                           n_recomputed=rec.numel(), recomputed_fraction=rec.numel() / max(n_ctx, 1), n_context=n_ctx,
                           extra=dict(query_logits=q_logits, active_per_layer=nsel_hist, prefix_len=P, chunk_lens=lens))

    def _select(self, fk, fv, ck, cv, act, cand, forced, count, how, deviation_on, seed, k_count=None):
        """Indices into ``act`` of the tokens that keep running. fk/fv/ck/cv: [H, A, D];
        ``k_count``: kv_budget's share for K's ranking (15% of the context tokens)."""
        a = act.cpu()
        f_rel = forced[a].to(fk.device)
        c_rel = cand[a].to(fk.device)
        if how == "explicit":
            return f_rel.nonzero().flatten()
        if how == "random":
            g = torch.Generator().manual_seed(seed)
            r = torch.rand(a.numel(), generator=g).to(fk.device)
            m = torch.empty(a.numel(), dtype=torch.bool, device=fk.device)
            topk_mask_into(r, count, f_rel, c_rel, m)
            return m.nonzero().flatten()
        tk = lambda t: t.transpose(0, 1)  # [A, H, D] views
        if deviation_on in ("kv_norm", "kv_union", "kv_budget"):  # both deviations, combined
            dk = select_tokens(tk(fk), tk(ck), count=0).deviation
            dv = select_tokens(fresh_v=tk(fv), cached_v=tk(cv), count=0).deviation
            m = torch.empty(a.numel(), dtype=torch.bool, device=fk.device)
            if deviation_on == "kv_norm":  # each over its mean on the free candidates
                w = c_rel & ~f_rel
                nk = dk[w].mean().clamp_min(1e-30) if bool(w.any()) else dk.new_ones(())
                nv = dv[w].mean().clamp_min(1e-30) if bool(w.any()) else dv.new_ones(())
                topk_mask_into(dk / nk + dv / nv, count, f_rel, c_rel, m)
            else:  # n_k tokens by K's ranking (half, or kv_budget's share), the rest by V's
                n_k = (count + 1) // 2 if deviation_on == "kv_union" else (
                    count if k_count is None else min(count, k_count))
                by_k = torch.empty_like(m)
                topk_mask_into(dk, n_k, f_rel, c_rel, by_k)
                topk_mask_into(dv, count - n_k, by_k, c_rel, m)
            return m.nonzero().flatten()
        s = select_tokens(tk(fk) if "k" in deviation_on else None, tk(ck) if "k" in deviation_on else None,
                          tk(fv) if "v" in deviation_on else None, tk(cv) if "v" in deviation_on else None,
                          count=count, forced=f_rel, candidates=c_rel)
        return s.indices


DEVIATIONS = ("k", "v", "kv", "kv_norm", "kv_union", "kv_budget")
KV_BUDGET_K = 0.15  # kv_budget: the fraction of the context K's ranking picks before V's takes over


def _apply_rope(q, k, cos, sin):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)


def _to_dynamic_cache(config, K, V):
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for li in range(K.shape[0]):
        cache.update(K[li][None].contiguous(), V[li][None].contiguous(), li)
    return cache
