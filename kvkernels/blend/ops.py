"""Blend ops: ``torch.library`` custom ops, dispatch registration, validation, public wrappers.

* :func:`rerotate_keys` -- move cached keys from their stored RoPE positions to new ones, in
  place (``kvkernels::rerotate_keys``, mutates ``key``).
* :func:`rerotate_keys_paged` -- the same for keys that live in an engine's paged cache
  (a :class:`~kvkernels.layouts.PagedLayout` and a slot mapping; ``kvkernels::rerotate_keys_paged``,
  mutates the K caches).
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


def cos_sin_cache_from_inv_freq(inv_freq: torch.Tensor, max_pos: int, dtype=torch.float32) -> torch.Tensor:
    """``[max_pos, 2 * len(inv_freq)]`` cos/sin cache (vLLM's layout) computed in float64."""
    p = torch.arange(max_pos, dtype=torch.float64, device=inv_freq.device)
    f = p[:, None] * inv_freq.double()[None, :]
    return torch.cat([f.cos(), f.sin()], dim=-1).to(dtype)
