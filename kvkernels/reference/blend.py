"""Reference (the spec and the CPU path) of the blend ops: RoPE re-rotation of cached keys and
the selection of tokens to recompute (CacheBlend-style), plus the gather/scatter of selected
tokens.

Conventions (shared by every backend):

* ``key``: ``[L, T, H, D]`` (layers, tokens, KV heads, head_dim), bf16/fp16/fp32, or
  float8_e4m3fn with ``k_scale``; any strides (the public API passes views as they are).
* ``old_pos``, ``new_pos``: int64 ``[T]``: token ``t`` of every layer and head was rotated
  to ``old_pos[t]``; after the op it is rotated to ``new_pos[t]``.
* ``cos_sin_cache``: float ``[max_pos, rot_dim]`` as vLLM holds it: row ``p`` is
  ``cos(p * theta_i)`` for ``i < rot_dim/2`` then ``sin(p * theta_i)``. Only the first
  ``rot_dim`` channels of head_dim are rotary (partial rotary); the rest are left as they are.
* ``is_neox``: NeoX / rotate-half pairs channel ``i`` with ``i + rot_dim/2`` (HF Llama, vLLM
  default); GPT-J / interleaved pairs ``2i`` with ``2i + 1``. Pair ``i`` uses ``theta_i``.
* The rotation is computed from the stored position directly (never chained): in float32,
  ``cos_d = cos_n * cos_o + sin_n * sin_o`` and ``sin_d = sin_n * cos_o - cos_n * sin_o``
  (the rotation by ``new - old``), then ``x1' = x1 * cos_d - x2 * sin_d``,
  ``x2' = x2 * cos_d + x1 * sin_d``, rounded once to the key's dtype.
* fp8 keys: ``x = code * scale`` (float32), rotated, stored as
  ``clamp(x * (1 / scale), -448, 448)`` in e4m3 (the convention of ``kvkernels.quantize``):
  the rotation commutes with per-tensor / per-head / per-token scales. ``k_scale`` is float32
  broadcastable to ``[L, T, H]`` (given here already expanded to it, strides may be 0).
* A token whose ``old_pos`` or ``new_pos`` lies outside ``[0, max_pos)`` is left untouched
  (kernels never read outside the cache; the public API raises on such positions when it can
  see them without a device sync).
"""
from __future__ import annotations

from typing import Optional

import torch

from .quant import e4m3_codes

FP8_MAX = 448.0


def _valid(pos: torch.Tensor, max_pos: int) -> torch.Tensor:
    return (pos >= 0) & (pos < max_pos)


def delta_cos_sin(old_pos: torch.Tensor, new_pos: torch.Tensor, cos_sin_cache: torch.Tensor,
                  dtype=torch.float32):
    """(cos_d, sin_d, valid): ``[T, rot_dim/2]`` in ``dtype`` and a bool ``[T]`` mask."""
    max_pos, rot = cos_sin_cache.shape
    half = rot // 2
    ok = _valid(old_pos, max_pos) & _valid(new_pos, max_pos)
    o = torch.where(ok, old_pos, torch.zeros_like(old_pos))
    n = torch.where(ok, new_pos, torch.zeros_like(new_pos))
    cs = cos_sin_cache.to(dtype)
    co, so = cs[o, :half], cs[o, half:]
    cn, sn = cs[n, :half], cs[n, half:]
    cd = cn * co + sn * so
    sd = sn * co - cn * so
    return cd, sd, ok


def rotate_pairs(x: torch.Tensor, cd: torch.Tensor, sd: torch.Tensor, rot: int, is_neox: bool) -> torch.Tensor:
    """Rotate the rotary channels of ``x`` ``[L, T, H, D]`` (float) by ``cd``/``sd`` ``[T, rot/2]``."""
    half = rot // 2
    c = cd[None, :, None, :]
    s = sd[None, :, None, :]
    y = x.clone()
    if is_neox:
        x1, x2 = x[..., :half], x[..., half:rot]
        y[..., :half] = x1 * c - x2 * s
        y[..., half:rot] = x2 * c + x1 * s
    else:
        x1, x2 = x[..., 0:rot:2], x[..., 1:rot:2]
        y[..., 0:rot:2] = x1 * c - x2 * s
        y[..., 1:rot:2] = x2 * c + x1 * s
    return y


def rerotate_keys_into(key: torch.Tensor, old_pos: torch.Tensor, new_pos: torch.Tensor,
                       cos_sin_cache: torch.Tensor, is_neox: bool, k_scale: Optional[torch.Tensor]) -> None:
    """In place: ``key`` ``[L, T, H, D]`` moved from ``old_pos`` to ``new_pos`` (see module doc)."""
    rot = cos_sin_cache.shape[1]
    cd, sd, ok = delta_cos_sin(old_pos, new_pos, cos_sin_cache)
    if key.dtype == torch.float8_e4m3fn:
        sc = k_scale.float().unsqueeze(-1)  # [L, T, H, 1]
        x = key.float() * sc
        y = rotate_pairs(x, cd, sd, rot, is_neox)
        inv = 1.0 / sc
        y = e4m3_codes((y * inv).clamp_(-FP8_MAX, FP8_MAX))
        dst = key.view(torch.uint8)
    else:
        y = rotate_pairs(key.float(), cd, sd, rot, is_neox).to(key.dtype)
        dst = key
    dst.copy_(torch.where(ok[None, :, None, None], y, dst))


# ---- selection -------------------------------------------------------------------------------
def token_deviation(fresh_k, cached_k, fresh_v, cached_v) -> torch.Tensor:
    """float32 ``[T]``: sum over heads and head_dim of the squared difference (in float32) of
    each given (fresh, cached) pair, K then V. Inputs ``[T, H, D]``, any strides."""
    dev = None
    for f, c in ((fresh_k, cached_k), (fresh_v, cached_v)):
        if f is None:
            continue
        d = (f.float() - c.float()).square().sum(dim=(-2, -1))
        dev = d if dev is None else dev + d
    return dev


def topk_mask_into(deviation: torch.Tensor, count: int, forced: Optional[torch.Tensor],
                   candidates: Optional[torch.Tensor], mask: torch.Tensor) -> None:
    """``mask`` (bool ``[T]``) = forced | the ``count`` eligible tokens of largest deviation.

    Eligible: ``candidates`` (all if None) and not ``forced``. Ties go to the lower index; NaN
    counts as the largest deviation. If fewer than ``count`` are eligible, all of them are picked.
    """
    T = deviation.shape[0]
    elig = torch.ones(T, dtype=torch.bool, device=deviation.device)
    if candidates is not None:
        elig &= candidates
    if forced is not None:
        elig &= ~forced
    d = torch.nan_to_num(deviation.float(), nan=float("inf"))
    # eligible first (key 1), then by deviation; a stable sort keeps ties in index order
    d = torch.where(elig, d, torch.full_like(d, -float("inf")))  # deviations are >= 0
    order = torch.sort(d, descending=True, stable=True).indices
    k = max(0, min(int(count), T))
    top = order[:k]
    m = torch.zeros(T, dtype=torch.bool, device=deviation.device)
    m[top] = elig[top]
    if forced is not None:
        m |= forced
    mask.copy_(m)


def select_tokens_into(fresh_k, cached_k, fresh_v, cached_v, count: int, forced, candidates,
                       mask: torch.Tensor, deviation: torch.Tensor) -> None:
    """Writes ``deviation`` (float32 ``[T]``) and ``mask`` (bool ``[T]``); see the functions above."""
    deviation.copy_(token_deviation(fresh_k, cached_k, fresh_v, cached_v))
    topk_mask_into(deviation, count, forced, candidates, mask)


# ---- gather / scatter of selected tokens -----------------------------------------------------
# Normal form (what the ops receive): every tensor is a 3-D view ``[tokens, R, C]`` (the token
# dim first, the dims between it and the last collapsed into R, the last dim C dense), and
# ``index`` int64 ``[S]``. An index outside ``[0, T)`` skips its row (nothing read or written
# for it); scatter indices must be distinct.
def gather_tokens_into(xs, index: torch.Tensor, outs) -> None:
    """``outs[i][s] = xs[i][index[s]]`` for each pair: ``xs[i]`` ``[T, R, C]``, ``outs[i]``
    ``[S, R, C]`` of the same dtype (hidden states, positions, K/V rows)."""
    for x, out in zip(xs, outs):
        ok = (index >= 0) & (index < x.shape[0])
        sel = ok.nonzero().flatten()
        out[sel] = x[index[sel]]


def scatter_tokens_into(caches, index: torch.Tensor, srcs) -> None:
    """``caches[i][index[s]] = srcs[i][s]`` for each pair (``[T, R, C]`` / ``[S, R, C]``),
    rounded (RNE) to the cache's dtype (recomputed K/V into the blended cache)."""
    for c, src in zip(caches, srcs):
        ok = (index >= 0) & (index < c.shape[0])
        sel = ok.nonzero().flatten()
        c[index[sel]] = src[sel].to(c.dtype)


def gather_tokens(x: torch.Tensor, index: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The selected tokens of ``x`` along ``dim`` (hidden states ``[T, hidden]``, positions ``[T]``)."""
    return x.index_select(dim, index)


def scatter_tokens_(cache: torch.Tensor, index: torch.Tensor, src: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``cache[index] = src`` along ``dim`` in place (recomputed K/V back into ``[T, H, D]``)."""
    return cache.index_copy_(dim, index, src.to(cache.dtype))


# ---- paged keys ------------------------------------------------------------------------------
def rerotate_keys_paged_into(layout, slots: torch.Tensor, old_pos: torch.Tensor, new_pos: torch.Tensor,
                             cos_sin_cache: torch.Tensor, is_neox: bool, k_scale: Optional[torch.Tensor]) -> None:
    """In place: the K caches of ``layout`` (a :class:`~kvkernels.layouts.PagedLayout`; the first
    ``L`` of its per-(kv, layer) caches) at the tokens of ``slots`` (int64 ``[T]``; slot ``s`` is
    block ``s // block_size``, offset ``s % block_size``) moved from ``old_pos`` to ``new_pos``
    (int64 ``[T]``), every layer and head. A slot outside ``[0, num_blocks * block_size)`` skips
    its token (as an out-of-range position does); slots must be distinct. fp8 caches:
    ``k_scale`` float32 ``[L, H]`` (strides may be 0), codes as in :func:`rerotate_keys_into`."""
    L, H, D, BS = layout.num_layers, layout.num_heads, layout.head_dim, layout.block_size
    ok = (slots >= 0) & (slots < layout.num_slots)
    idx = ok.nonzero().flatten()
    if idx.numel() == 0:
        return
    s = slots[idx]
    b, o = s // BS, s % BS
    n = idx.numel()
    views = layout.views()[:L]  # [NB, BS, H, D // x, x] each (uint8 for fp8)
    for l in range(L):
        v = views[l]
        k = v[b, o].reshape(1, n, H, D)  # a copy, gathered
        sc = None
        if layout.fp8:
            k = k.view(torch.float8_e4m3fn)
            sc = k_scale[l][None, None, :].expand(1, n, H)
        rerotate_keys_into(k, old_pos[idx], new_pos[idx], cos_sin_cache, is_neox, sc)
        if layout.fp8:
            k = k.view(torch.uint8)
        v[b, o] = k.reshape(n, H, D // layout.x, layout.x).to(v.dtype)
