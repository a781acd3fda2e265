"""Blend ops: ``torch.library`` custom ops, dispatch registration, validation, public wrappers.

* :func:`rerotate_keys` -- move cached keys from their stored RoPE positions to new ones, in
  place (``kvkernels::rerotate_keys``, mutates ``key``).
* :func:`rerotate_keys_paged` -- the same for keys that live in an engine's paged cache
  (a :class:`~kvkernels.layouts.PagedLayout` and a slot mapping; ``kvkernels::rerotate_keys_paged``,
  mutates the K caches).
* :func:`gather_tokens` / :func:`scatter_tokens` -- the selected tokens' rows out of hidden
  states / positions, and their recomputed K/V back into the cache (``kvkernels::gather_tokens``
  mutates its outputs, ``kvkernels::scatter_tokens`` the caches).
* :func:`select_tokens` -- per-token KV deviation and the top-k tokens to recompute, joined with
  the tokens that must always be computed (``kvkernels::select_tokens``, mutates its
  ``mask`` / ``deviation`` outputs).

The math is in ``kvkernels/reference/blend.py`` (the spec).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Union

import dataclasses

import torch

from .. import dispatch
from ..layouts import PagedLayout

for _b, _mod in (("cuda", "kvkernels.cuda.blend"), ("triton", "kvkernels.triton_kernels.blend"),
                 ("torch", "kvkernels.reference.blend")):
    dispatch.register("rerotate_keys", _b, _mod, "rerotate_keys_into", None if _b == "torch" else "supports")
    dispatch.register("rerotate_keys_paged", _b, _mod, "rerotate_keys_paged_into",
                      None if _b == "torch" else "supports_paged")
for _b, _mod in (("triton", "kvkernels.triton_kernels.blend"), ("torch", "kvkernels.reference.blend")):
    dispatch.register("gather_tokens", _b, _mod, "gather_tokens_into", None if _b == "torch" else "supports_rows")
    dispatch.register("scatter_tokens", _b, _mod, "scatter_tokens_into", None if _b == "torch" else "supports_rows")
    dispatch.register("select_tokens", _b, _mod, "select_tokens_into", None if _b == "torch" else "supports_select")

KEY_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)
KV_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
POS_DTYPES = (torch.int64, torch.int32)


# ---- torch.library ops -----------------------------------------------------------------------
def _rot_key(key, cos_sin_cache, is_neox, k_scale):
    return (key.device, key.dtype, cos_sin_cache.dtype, tuple(key.shape[-2:]), cos_sin_cache.shape[1], is_neox,
            k_scale is not None, key.numel() >= 2**31)


@torch.library.custom_op("kvkernels::rerotate_keys", mutates_args=("key",))
def rerotate_keys_op(key: torch.Tensor, old_pos: torch.Tensor, new_pos: torch.Tensor, cos_sin_cache: torch.Tensor,
                     is_neox: bool, k_scale: Optional[torch.Tensor], backend: Optional[str]) -> None:
    """key ``[L, T, H, D]`` (fp8: ``k_scale`` float32 expanded to ``[L, T, H]``), positions int64 ``[T]``."""
    case = (key, cos_sin_cache, is_neox, k_scale)
    _, impl = dispatch.resolve("rerotate_keys", _rot_key(*case), case, backend, key.device.type)
    impl(key, old_pos, new_pos, cos_sin_cache, is_neox, k_scale)


@rerotate_keys_op.register_fake
def _(key, old_pos, new_pos, cos_sin_cache, is_neox, k_scale, backend) -> None:
    return None


def _k_layout(spec: List[int], caches: List[torch.Tensor], ptrs: torch.Tensor) -> PagedLayout:
    """The K caches of a layout, from an op's primitive arguments (``spec``: a one-cache
    ``PagedLayout.spec()``, ``caches`` its L bases, ``ptrs`` their addresses)."""
    L, _, NB, BS, H, D, x, dcode = spec[:8]
    return PagedLayout(engine="op", num_layers=L, num_kv=1, num_blocks=NB, block_size=BS, num_heads=H, head_dim=D,
                       dtype=caches[0].dtype, fp8=dcode == 3, strides=(tuple(spec[8:13]),), x=x,
                       device=caches[0].device, bases=tuple(caches), ptrs=ptrs)


@torch.library.custom_op("kvkernels::rerotate_keys_paged", mutates_args=("caches",))
def rerotate_keys_paged_op(caches: List[torch.Tensor], ptrs: torch.Tensor, spec: List[int], slots: torch.Tensor,
                           old_pos: torch.Tensor, new_pos: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool,
                           k_scale: Optional[torch.Tensor], backend: Optional[str]) -> None:
    """The K caches (``caches``: L tensors, ``ptrs`` their int64 addresses, ``spec`` a one-cache
    layout spec), tokens at ``slots`` (int64 ``[T]``), positions int64 ``[T]``; fp8: ``k_scale``
    float32 ``[L, H]``."""
    lay = _k_layout(spec, caches, ptrs)
    key = (tuple(spec), lay.dtype, lay.device, cos_sin_cache.dtype, cos_sin_cache.shape[1], is_neox,
           slots.shape[0] * lay.num_layers >= 2**31)
    case = (lay, slots, cos_sin_cache, is_neox)
    _, impl = dispatch.resolve("rerotate_keys_paged", key, case, backend, lay.device.type)
    impl(lay, slots, old_pos, new_pos, cos_sin_cache, is_neox, k_scale)


@rerotate_keys_paged_op.register_fake
def _(caches, ptrs, spec, slots, old_pos, new_pos, cos_sin_cache, is_neox, k_scale, backend) -> None:
    return None


def _rows_key(xs, ys):
    return tuple((x.device, x.dtype, y.dtype, x.dim(), y.dim(), x.stride(-1) == 1 or x.shape[-1] <= 1,
                  y.stride(-1) == 1 or y.shape[-1] <= 1,
                  max(t.shape[0] * t.shape[1] if t.dim() >= 2 else 0 for t in (x, y)) >= 2**31)
                 for x, y in zip(xs, ys))


@torch.library.custom_op("kvkernels::gather_tokens", mutates_args=("outs",))
def gather_tokens_op(xs: List[torch.Tensor], index: torch.Tensor, outs: List[torch.Tensor],
                     backend: Optional[str]) -> None:
    """``outs[i][s] = xs[i][index[s]]``: ``xs[i]`` ``[T, R, C]``, ``outs[i]`` ``[S, R, C]``, index int64 ``[S]``."""
    case = (xs, outs)
    _, impl = dispatch.resolve("gather_tokens", _rows_key(xs, outs), case, backend, xs[0].device.type)
    impl(xs, index, outs)


@gather_tokens_op.register_fake
def _(xs, index, outs, backend) -> None:
    return None


@torch.library.custom_op("kvkernels::scatter_tokens", mutates_args=("caches",))
def scatter_tokens_op(caches: List[torch.Tensor], index: torch.Tensor, srcs: List[torch.Tensor],
                      backend: Optional[str]) -> None:
    """``caches[i][index[s]] = srcs[i][s]``: ``caches[i]`` ``[T, R, C]``, ``srcs[i]`` ``[S, R, C]``."""
    case = (srcs, caches)
    _, impl = dispatch.resolve("scatter_tokens", _rows_key(srcs, caches), case, backend, caches[0].device.type)
    impl(caches, index, srcs)


@scatter_tokens_op.register_fake
def _(caches, index, srcs, backend) -> None:
    return None


@torch.library.custom_op("kvkernels::select_tokens", mutates_args=("mask", "deviation"))
def select_tokens_op(fresh_k: Optional[torch.Tensor], cached_k: Optional[torch.Tensor],
                     fresh_v: Optional[torch.Tensor], cached_v: Optional[torch.Tensor], count: int,
                     forced: Optional[torch.Tensor], candidates: Optional[torch.Tensor], mask: torch.Tensor,
                     deviation: torch.Tensor, backend: Optional[str]) -> None:
    """(fresh, cached) K and/or V ``[T, H, D]`` -> deviation float32 ``[T]``, mask bool ``[T]``."""
    ref = fresh_k if fresh_k is not None else fresh_v
    key = (ref.device, ref.dtype, tuple(ref.shape[-2:]), fresh_k is not None, fresh_v is not None)
    case = (fresh_k, cached_k, fresh_v, cached_v)
    _, impl = dispatch.resolve("select_tokens", key, case, backend, ref.device.type)
    impl(fresh_k, cached_k, fresh_v, cached_v, count, forced, candidates, mask, deviation)


@select_tokens_op.register_fake
def _(fresh_k, cached_k, fresh_v, cached_v, count, forced, candidates, mask, deviation, backend) -> None:
    return None


# ---- validation ------------------------------------------------------------------------------
def _tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def _positions(name, p, T, device) -> torch.Tensor:
    _tensor(name, p)
    if p.dtype not in POS_DTYPES:
        raise TypeError(f"{name}: expected an int64 or int32 tensor, got {p.dtype}")
    if p.dim() != 1 or p.shape[0] != T:
        raise ValueError(f"{name}: expected shape [{T}] (one position per token of key), got {tuple(p.shape)}")
    if p.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got {p.device}")
    return p.to(torch.int64)


def _check_range(name, p, max_pos) -> None:
    if p.numel() == 0:
        return
    lo, hi = int(p.min()), int(p.max())
    if lo < 0 or hi >= max_pos:
        raise ValueError(f"{name}: positions must lie in [0, {max_pos}) (the rows of cos_sin_cache), "
                         f"got values in [{lo}, {hi}]")


def _check_cos_sin(cos_sin_cache, rot_dim, D, device) -> int:
    _tensor("cos_sin_cache", cos_sin_cache)
    if cos_sin_cache.dtype not in CACHE_DTYPES:
        raise TypeError(f"cos_sin_cache: expected a float tensor, got {cos_sin_cache.dtype}")
    if cos_sin_cache.dim() != 2:
        raise ValueError(f"cos_sin_cache: expected shape [max_pos, rot_dim], got {tuple(cos_sin_cache.shape)}")
    max_pos, rot = cos_sin_cache.shape
    if rot_dim is not None and rot_dim != rot:
        raise ValueError(f"cos_sin_cache: has rot_dim {rot}, expected rot_dim={rot_dim}")
    if rot % 2 or rot == 0 or rot > D:
        raise ValueError(f"cos_sin_cache: rot_dim {rot} must be even, > 0 and <= head_dim {D}")
    if max_pos == 0:
        raise ValueError("cos_sin_cache: has no rows (max_pos = 0)")
    if cos_sin_cache.device != device:
        raise ValueError(f"cos_sin_cache: expected a tensor on {device}, got {cos_sin_cache.device}")
    return max_pos


def rerotate_keys(key: torch.Tensor, old_positions: torch.Tensor, new_positions: torch.Tensor,
                  cos_sin_cache: torch.Tensor, *, is_neox: bool = True, k_scale: Optional[torch.Tensor] = None,
                  rot_dim: Optional[int] = None, num_kv_heads: Optional[int] = None,
                  validate: Optional[bool] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Re-rotate cached keys in place from their stored RoPE positions to new ones.

    Each key is rotated once from its stored position (the rotation by ``new - old``, composed
    in float32 from the cache's rows at both positions); shifts are never chained.

    Args:
        key: ``[T, H, D]`` or ``[L, T, H, D]`` (tokens, KV heads, head_dim; optional layers),
            post-RoPE keys in bf16/fp16/fp32, or float8_e4m3fn with ``k_scale``; head_dim dense
            (stride 1), other strides arbitrary (e.g. a ``[H, T, D]`` cache seen transposed).
            Modified in place and returned.
        old_positions, new_positions: int64 (or int32) ``[T]`` on key's device: the position
            each token was rotated to, and the one it moves to (the same for all layers/heads).
        cos_sin_cache: ``[max_pos, rot_dim]`` float (as vLLM holds it): row ``p`` is
            ``cos(p*theta_i)`` for ``i < rot_dim/2``, then ``sin(p*theta_i)``. Only the first
            ``rot_dim`` channels are rotated (partial rotary). Use unscaled cos/sin (YaRN's
            magnitude factor must not enter a relative rotation).
        is_neox: True: rotate-half pairs (``i``, ``i + rot_dim/2``) (HF Llama, vLLM default);
            False: GPT-J interleaved pairs (``2i``, ``2i+1``).
        k_scale: fp8 keys only: float32 dequantization scale broadcastable to ``key.shape[:-1]``
            (``[]`` per tensor, ``[H]`` per head, ``[T, H]`` per token-head, with an ``L`` in
            front for 4-D keys); codes are rewritten as ``clamp(x / scale, ±448)``.
        rot_dim, num_kv_heads: optional expectations (e.g. from the model's config): a mismatch
            with ``cos_sin_cache.shape[1]`` / ``key``'s head count raises ``ValueError``.
        validate: check the position values against ``max_pos``: None (default) checks them
            when they are on the CPU (no device sync); True always (syncs); False never.
            Kernels skip tokens with positions outside the cache either way.
        backend: ``"cuda"``, ``"triton"`` or ``"torch"``; default: ``KVKERNELS_BACKEND`` or the
            first backend that supports the case.
    """
    _tensor("key", key)
    if key.dtype not in KEY_DTYPES:
        raise TypeError(f"key: expected dtype in {[str(d) for d in KEY_DTYPES]}, got {key.dtype}")
    if key.dim() not in (3, 4):
        raise ValueError(f"key: expected shape [T, H, D] or [L, T, H, D], got {tuple(key.shape)}")
    if key.stride(-1) != 1:
        raise ValueError(f"key: the last dim (head_dim) must be dense (stride 1), got strides {key.stride()}")
    k4 = key if key.dim() == 4 else key.unsqueeze(0)
    L, T, H, D = k4.shape
    if num_kv_heads is not None and num_kv_heads != H:
        raise ValueError(f"key: has {H} KV heads, expected num_kv_heads={num_kv_heads}")
    max_pos = _check_cos_sin(cos_sin_cache, rot_dim, D, key.device)
    old = _positions("old_positions", old_positions, T, key.device)
    new = _positions("new_positions", new_positions, T, key.device)
    if validate or (validate is None and key.device.type == "cpu"):
        _check_range("old_positions", old, max_pos)
        _check_range("new_positions", new, max_pos)
    sc = None
    if key.dtype == torch.float8_e4m3fn:
        if k_scale is None:
            raise ValueError("k_scale: fp8 keys need their float32 scale")
        _tensor("k_scale", k_scale)
        if k_scale.dtype != torch.float32:
            raise TypeError(f"k_scale: expected float32, got {k_scale.dtype}")
        if k_scale.device != key.device:
            raise ValueError(f"k_scale: expected a tensor on {key.device}, got {k_scale.device}")
        try:
            sc = torch.broadcast_to(k_scale, key.shape[:-1])
        except RuntimeError:
            raise ValueError(f"k_scale: shape {tuple(k_scale.shape)} does not broadcast to key's "
                             f"{tuple(key.shape[:-1])} (per tensor [], per head [H], per token-head [T, H])") from None
        sc = sc if key.dim() == 4 else sc.unsqueeze(0)
    elif k_scale is not None:
        raise ValueError(f"k_scale: only fp8 keys take a scale (key is {key.dtype})")
    if T and L and H:
        rerotate_keys_op(k4, old, new, cos_sin_cache.contiguous(), bool(is_neox), sc, backend)
    return key


def _paged_k_scale(k_scale, layout: PagedLayout) -> Optional[torch.Tensor]:
    """-> float32 ``[L, H]`` (0 strides for broadcast dims) for fp8 caches, None otherwise."""
    if not layout.fp8:
        if k_scale is not None:
            raise ValueError(f"k_scale: only fp8 caches take a scale (the caches are {layout.dtype})")
        return None
    if k_scale is None:
        raise ValueError("k_scale: fp8 caches need their float32 K scale (shape (), [1], [H], [L, 1] or [L, H])")
    _tensor("k_scale", k_scale)
    if k_scale.dtype != torch.float32:
        raise TypeError(f"k_scale: expected float32, got {k_scale.dtype}")
    if k_scale.device != layout.device:
        raise ValueError(f"k_scale: expected a tensor on {layout.device}, got {k_scale.device}")
    L, H = layout.num_layers, layout.num_heads
    shp = tuple(k_scale.shape)
    if shp in ((), (1,)):
        s = k_scale.reshape(1, 1)
    elif shp == (H,):
        s = k_scale.reshape(1, H)
    elif shp in ((L, 1), (L, H)):
        s = k_scale
    else:
        raise ValueError(f"k_scale: expected shape (), [1], [H]={H}, [L, 1] or [L, H]=[{L}, {H}], got {shp}")
    return s.expand(L, H)


def rerotate_keys_paged(layout: PagedLayout, slot_mapping: torch.Tensor, old_positions: torch.Tensor,
                        new_positions: torch.Tensor, cos_sin_cache: torch.Tensor, *, is_neox: bool = True,
                        k_scale: Optional[torch.Tensor] = None, rot_dim: Optional[int] = None,
                        num_kv_heads: Optional[int] = None, validate: Optional[bool] = None,
                        backend: Optional[str] = None) -> None:
    """Re-rotate, in place, keys that live in an engine's paged K caches (every layer).

    The paged counterpart of :func:`rerotate_keys` (same rotation, rounding and fp8 handling):
    token ``t`` of ``slot_mapping`` (slot ``block * block_size + offset``, vLLM's convention)
    is rotated, in the K cache of every layer of ``layout``, from ``old_positions[t]`` to
    ``new_positions[t]``, once from its stored position. V caches are not touched.

    Args:
        layout: a :class:`~kvkernels.layouts.PagedLayout` with K and V (``num_kv == 2``): any of
            its constructors (vLLM NHD/HND, the 2026 K|V side-by-side view, FlashInfer, legacy
            x-split K, cross-layer, SGLang). Its K caches are modified in place.
        slot_mapping: int32/int64 ``[T]`` on the caches' device; ``< 0`` skips a token; slots
            must be distinct (a token appears once).
        old_positions, new_positions: int64 (or int32) ``[T]`` on the caches' device.
        cos_sin_cache: ``[max_pos, rot_dim]`` as in :func:`rerotate_keys`.
        is_neox, rot_dim, num_kv_heads, backend: as in :func:`rerotate_keys`.
        k_scale: fp8 caches only (required there): float32 K scale of shape ``()``/``[1]``,
            ``[H]``, ``[L, 1]`` or ``[L, H]`` (the paged ops' convention, ``kvkernels.scatter``).
        validate: check slot and position values on the host (range; distinct slots): None
            (default) when they are on the CPU (no device sync); True always (syncs); False never.
            Kernels skip tokens whose slot or positions are out of range either way.

    Raises ``ValueError`` / ``TypeError`` naming the argument before anything is written.
    """
    if not isinstance(layout, PagedLayout):
        raise TypeError(f"layout: expected a kvkernels.PagedLayout, got {type(layout).__name__}")
    if layout.ptrs is None or len(layout.bases) != layout.num_kv * layout.num_layers:
        raise ValueError("layout: has no caches bound (build it with a PagedLayout constructor)")
    if layout.num_kv != 2:
        raise ValueError("layout: a latent (MLA) cache keeps its rotary channels after kv_lora_rank; "
                         "rerotate_keys_paged supports K/V layouts (num_kv == 2) only")
    L, H, D = layout.num_layers, layout.num_heads, layout.head_dim
    if num_kv_heads is not None and num_kv_heads != H:
        raise ValueError(f"layout: has {H} KV heads, expected num_kv_heads={num_kv_heads}")
    _tensor("slot_mapping", slot_mapping)
    if slot_mapping.dtype not in POS_DTYPES:
        raise TypeError(f"slot_mapping: expected an int64 or int32 tensor, got {slot_mapping.dtype}")
    if slot_mapping.dim() != 1:
        raise ValueError(f"slot_mapping: expected a 1-D tensor [T], got shape {tuple(slot_mapping.shape)}")
    if slot_mapping.device != layout.device:
        raise ValueError(f"slot_mapping: expected a tensor on {layout.device} (the caches' device), "
                         f"got {slot_mapping.device}")
    T = slot_mapping.shape[0]
    max_pos = _check_cos_sin(cos_sin_cache, rot_dim, D, layout.device)
    old = _positions("old_positions", old_positions, T, layout.device)
    new = _positions("new_positions", new_positions, T, layout.device)
    slots = slot_mapping.to(torch.int64)
    sc = _paged_k_scale(k_scale, layout)
    if validate or (validate is None and layout.device.type == "cpu"):
        _check_range("old_positions", old, max_pos)
        _check_range("new_positions", new, max_pos)
        sv = slots.cpu()
        if T and int(sv.max()) >= layout.num_slots:
            raise ValueError(f"slot_mapping: slots must be < {layout.num_slots} ({layout.num_blocks} blocks x "
                             f"{layout.block_size}), got {int(sv.max())}; negative slots skip a token")
        used = sv[sv >= 0]
        if used.numel() != torch.unique(used).numel():
            raise ValueError("slot_mapping: slots must be distinct (a token would be rotated twice)")
    if T == 0:
        return None
    k = dataclasses.replace(layout, num_kv=1, strides=(layout.strides[0],), bases=tuple(layout.bases[:L]),
                            ptrs=layout.ptrs[:L])
    rerotate_keys_paged_op(list(k.bases), k.ptrs, k.spec(), slots, old, new, cos_sin_cache.contiguous(),
                           bool(is_neox), sc, backend)
    return None


class Selection(NamedTuple):
    """Result of :func:`select_tokens`."""
    indices: torch.Tensor    # int64 [S], ascending: the tokens to recompute
    mask: torch.Tensor       # bool [T]
    deviation: torch.Tensor  # float32 [T]


def _kv3(name, t, like=None):
    _tensor(name, t)
    if t.dtype not in KV_DTYPES:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in KV_DTYPES]}, got {t.dtype}")
    if t.dim() != 3:
        raise ValueError(f"{name}: expected shape [T, H, D], got {tuple(t.shape)}")
    if like is not None:
        if t.shape[1] != like.shape[1]:
            raise ValueError(f"{name}: has {t.shape[1]} heads, the other inputs {like.shape[1]}")
        if tuple(t.shape) != tuple(like.shape):
            raise ValueError(f"{name}: expected shape {tuple(like.shape)}, got {tuple(t.shape)}")
        if t.device != like.device:
            raise ValueError(f"{name}: expected a tensor on {like.device}, got {t.device}")


def _token_mask(name, m, T, device) -> Optional[torch.Tensor]:
    if m is None:
        return None
    if isinstance(m, (range, list, tuple)):
        m = torch.as_tensor(list(m), dtype=torch.int64)
    _tensor(name, m)
    if m.dtype == torch.bool:
        if m.shape != (T,):
            raise ValueError(f"{name}: a bool mask must have shape [{T}], got {tuple(m.shape)}")
        return m.to(device)
    if m.dtype not in POS_DTYPES or m.dim() != 1:
        raise TypeError(f"{name}: expected a bool [T] mask or a 1-D int index tensor, got {m.dtype} {tuple(m.shape)}")
    if m.device.type == "cpu" and m.numel() and (int(m.min()) < 0 or int(m.max()) >= T):
        raise ValueError(f"{name}: indices must lie in [0, {T})")
    out = torch.zeros(T, dtype=torch.bool, device=device)
    out[m.to(device)] = True
    return out


def select_tokens(fresh_k: Optional[torch.Tensor] = None, cached_k: Optional[torch.Tensor] = None,
                  fresh_v: Optional[torch.Tensor] = None, cached_v: Optional[torch.Tensor] = None, *,
                  ratio: Optional[float] = None, count: Optional[int] = None,
                  forced: Union[None, torch.Tensor, Sequence[int]] = None,
                  candidates: Union[None, torch.Tensor, Sequence[int]] = None,
                  backend: Optional[str] = None) -> Selection:
    """Pick the tokens whose KV deviates most between a fresh computation and the cache.

    deviation[t] = sum over heads and head_dim of ``(fresh - cached)**2`` in float32, over K
    and/or V (whichever pairs are given; CacheBlend's rule is V, LMCache's K). The selection is
    ``forced`` joined with the ``count`` (or ``round(ratio * n_candidates)``) eligible tokens of
    largest deviation, eligible = in ``candidates`` (all by default; pass the previous layer's
    selection to narrow across layers) and not forced. Ties go to the lower index; NaN counts
    as the largest deviation.

    Args:
        fresh_k, cached_k, fresh_v, cached_v: ``[T, H, D]`` bf16/fp16/fp32 (any strides), all of
            the same shape and device; at least one (fresh, cached) pair.
        ratio: in [0, 1], a fraction of the candidates (exclusive with ``count``).
        count: >= 0 tokens picked by deviation (in addition to ``forced``).
        forced: tokens always selected (the query, uncached tokens, sinks): bool ``[T]`` or indices.
        candidates: tokens that may be picked by deviation: bool ``[T]`` or indices. With a
            device mask and ``ratio``, counting the candidates syncs the device.

    Returns:
        :class:`Selection` (``indices`` int64 ascending, ``mask`` bool ``[T]``, ``deviation``).
    """
    pairs = [(n1, a, n2, b) for n1, a, n2, b in (("fresh_k", fresh_k, "cached_k", cached_k),
                                                  ("fresh_v", fresh_v, "cached_v", cached_v))]
    like = None
    for n1, a, n2, b in pairs:
        if (a is None) != (b is None):
            raise ValueError(f"{n1 if a is None else n2}: given its counterpart but not itself")
        if a is not None:
            _kv3(n1, a, like)
            like = like if like is not None else a
            _kv3(n2, b, like)
    if like is None:
        raise ValueError("fresh_k/fresh_v: give at least one (fresh, cached) pair of K or V")
    T = like.shape[0]
    if (ratio is None) == (count is None):
        raise ValueError("ratio/count: give exactly one of them")
    fm = _token_mask("forced", forced, T, like.device)
    cm = _token_mask("candidates", candidates, T, like.device)
    if ratio is not None:
        if not isinstance(ratio, (int, float)) or not (0.0 <= float(ratio) <= 1.0):
            raise ValueError(f"ratio: expected a number in [0, 1], got {ratio!r}")
        n = T if cm is None else int(cm.sum())
        count = int(round(float(ratio) * n))
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"count: expected an int >= 0, got {count!r}")
    mask = torch.empty(T, dtype=torch.bool, device=like.device)
    dev = torch.empty(T, dtype=torch.float32, device=like.device)
    if T:
        select_tokens_op(fresh_k, cached_k, fresh_v, cached_v, count, fm, cm, mask, dev, backend)
    return Selection(indices=mask.nonzero().flatten(), mask=mask, deviation=dev)


# ---- gather / scatter of selected tokens ------------------------------------------------------
TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]


def _as_list(name, t) -> List[torch.Tensor]:
    if isinstance(t, torch.Tensor):
        return [t]
    if not isinstance(t, (list, tuple)) or not t:
        raise TypeError(f"{name}: expected a tensor or a non-empty list of tensors, got {type(t).__name__}")
    for i, x in enumerate(t):
        _tensor(f"{name}[{i}]", x)
    return list(t)


def _trc(name: str, t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` with ``dim`` moved first, seen as ``[tokens, R, C]`` (a view, never a copy)."""
    if t.dim() == 0:
        raise ValueError(f"{name}: expected at least one dim (the tokens), got a 0-d tensor")
    if not -t.dim() <= dim < t.dim():
        raise ValueError(f"dim: {dim} is out of range for {name} of shape {tuple(t.shape)}")
    x = t.movedim(dim, 0)
    if x.dim() == 1:
        return x.view(x.shape[0], 1, 1) if x.is_contiguous() else x.unsqueeze(1).unsqueeze(2)
    C = x.shape[-1]
    if x.stride(-1) != 1 and C > 1:
        raise ValueError(f"{name}: the last dim must be dense (stride 1), got strides {tuple(t.stride())}")
    try:
        return x.view(x.shape[0], -1, C) if x.numel() else x.reshape(x.shape[0], -1, C)
    except RuntimeError:
        raise ValueError(f"{name}: the dims between the token dim and the last one cannot be viewed as one "
                         f"(shape {tuple(t.shape)}, strides {tuple(t.stride())}); pass a view with those dims "
                         f"collapsible") from None


def _index(index, T: int, device, validate: Optional[bool], distinct: bool) -> torch.Tensor:
    _tensor("index", index)
    if index.dtype not in POS_DTYPES:
        raise TypeError(f"index: expected an int64 or int32 tensor, got {index.dtype}")
    if index.dim() != 1:
        raise ValueError(f"index: expected a 1-D tensor [S], got shape {tuple(index.shape)}")
    if index.device != device:
        raise ValueError(f"index: expected a tensor on {device}, got {index.device}")
    if validate or (validate is None and device.type == "cpu"):
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= T):
            raise ValueError(f"index: token indices must lie in [0, {T}), got values in "
                             f"[{int(index.min())}, {int(index.max())}]")
        if distinct and index.numel() != torch.unique(index).numel():
            raise ValueError("index: scatter indices must be distinct (two sources for one token)")
    return index.to(torch.int64)


def gather_tokens(x: TensorOrList, index: torch.Tensor, *, dim: int = 0, out: Optional[TensorOrList] = None,
                  validate: Optional[bool] = None, backend: Optional[str] = None) -> TensorOrList:
    """The selected tokens' rows: ``out = x.index_select(dim, index)``, as one data-moving kernel.

    For the tokens a blend recomputes: their hidden states (``[T, hidden]``, or HF's
    ``[1, T, hidden]`` with ``dim=1``), their positions (``[T]``), or rows of K/V.

    Args:
        x: a tensor, or a list of tensors (gathered with the same index in one launch per two
            tensors), each with the tokens along ``dim`` (size T; all the same T); any strides
            as long as the last dim is dense and the dims between ``dim`` and the last can be
            viewed as one. float32/16, bf16, fp8, int64/32/16/8, uint8, bool.
        index: int64/int32 ``[S]`` on ``x``'s device: the tokens to take, in output order.
        dim: the token dim.
        out: optional outputs (``x``'s shape with ``dim`` of size S, ``x``'s dtype and device,
            last dim dense); allocated if None.
        validate: check the index values on the host (None: when on the CPU; True syncs).
            Kernels skip (leave the output row unchanged for) indices outside ``[0, T)``.
        backend: ``"triton"`` or ``"torch"`` (default: ``KVKERNELS_BACKEND`` or the first that
            supports the case).

    Returns: ``out`` (a tensor, or a list if ``x`` was a list).
    """
    single = isinstance(x, torch.Tensor)
    xs = _as_list("x", x)
    S = index.shape[0] if isinstance(index, torch.Tensor) and index.dim() == 1 else 0
    T = None
    xv = []
    for i, t in enumerate(xs):
        name = "x" if single else f"x[{i}]"
        v = _trc(name, t, dim)
        if T is not None and v.shape[0] != T:
            raise ValueError(f"{name}: has {v.shape[0]} tokens along dim {dim}, the others {T}")
        if t.device != xs[0].device:
            raise ValueError(f"{name}: expected a tensor on {xs[0].device}, got {t.device}")
        T = v.shape[0]
        xv.append(v)
    idx = _index(index, T, xs[0].device, validate, False)
    if out is None:
        outs = []
        for t in xs:
            shp = list(t.shape)
            shp[dim] = S
            outs.append(torch.empty(shp, dtype=t.dtype, device=t.device))
    else:
        outs = _as_list("out", out)
        if len(outs) != len(xs):
            raise ValueError(f"out: expected {len(xs)} tensors like x, got {len(outs)}")
    ov = []
    for i, (t, o) in enumerate(zip(xs, outs)):
        name = "out" if single else f"out[{i}]"
        shp = list(t.shape)
        shp[dim] = S
        if tuple(o.shape) != tuple(shp) or o.dtype != t.dtype or o.device != t.device:
            raise ValueError(f"{name}: expected shape {tuple(shp)}, dtype {t.dtype} on {t.device}, got "
                             f"{tuple(o.shape)} {o.dtype} on {o.device}")
        ov.append(_trc(name, o, dim))
    if S and T:
        gather_tokens_op(xv, idx, ov, backend)
    return outs[0] if single else outs


def scatter_tokens(cache: TensorOrList, index: torch.Tensor, src: TensorOrList, *, dim: int = 0,
                   validate: Optional[bool] = None, backend: Optional[str] = None) -> TensorOrList:
    """Write the selected tokens' rows back, in place: ``cache.index_copy_(dim, index, src)``.

    For the recomputed K/V of a blend's selected tokens going back into the blended cache (e.g.
    ``scatter_tokens([K, V], index, [k_new, v_new], dim=1)`` for HF's ``[H, T, D]`` layer caches;
    K and V in one launch). For paged caches use :func:`kvkernels.scatter` with the selected
    tokens' slots.

    Args:
        cache: a tensor or a list of tensors (the same T along ``dim``), modified in place; last
            dim dense, the dims between ``dim`` and the last viewable as one.
        index: int64/int32 ``[S]``, distinct token indices (checked when validated).
        src: as many tensors, each its cache's shape with ``dim`` of size S, on its device, any
            dtype that rounds (RNE) to the cache's (e.g. float32 into bf16).
        dim, validate, backend: as in :func:`gather_tokens` (indices outside ``[0, T)`` skip).

    Returns: ``cache``.
    """
    single = isinstance(cache, torch.Tensor)
    cs = _as_list("cache", cache)
    ss = _as_list("src", src)
    if len(ss) != len(cs):
        raise ValueError(f"src: expected {len(cs)} tensors like cache, got {len(ss)}")
    S = index.shape[0] if isinstance(index, torch.Tensor) and index.dim() == 1 else 0
    cv, sv, T = [], [], None
    for i, (c, s) in enumerate(zip(cs, ss)):
        cn, sn = ("cache", "src") if single else (f"cache[{i}]", f"src[{i}]")
        v = _trc(cn, c, dim)
        if T is not None and v.shape[0] != T:
            raise ValueError(f"{cn}: has {v.shape[0]} tokens along dim {dim}, the others {T}")
        T = v.shape[0]
        shp = list(c.shape)
        shp[dim] = S
        if tuple(s.shape) != tuple(shp):
            raise ValueError(f"{sn}: expected shape {tuple(shp)} ({cn}'s with dim {dim} of size {S}), "
                             f"got {tuple(s.shape)}")
        if s.device != c.device or c.device != cs[0].device:
            raise ValueError(f"{sn}: expected a tensor on {cs[0].device}, got {s.device}")
        if (c.dtype == torch.bool) != (s.dtype == torch.bool) or (c.dtype.is_floating_point and not
                                                                   s.dtype.is_floating_point):
            raise TypeError(f"{sn}: dtype {s.dtype} cannot be written into {cn} of dtype {c.dtype}")
        cv.append(v)
        sv.append(_trc(sn, s, dim))
    idx = _index(index, T, cs[0].device, validate, True)
    if S and T:
        scatter_tokens_op(cv, idx, sv, backend)
    return cache


def cos_sin_cache_from_inv_freq(inv_freq: torch.Tensor, max_pos: int, dtype=torch.float32) -> torch.Tensor:
    """``[max_pos, 2 * len(inv_freq)]`` cos/sin cache (vLLM's layout) computed in float64."""
    p = torch.arange(max_pos, dtype=torch.float64, device=inv_freq.device)
    f = p[:, None] * inv_freq.double()[None, :]
    return torch.cat([f.cos(), f.sin()], dim=-1).to(dtype)
