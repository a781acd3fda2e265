"""CUDA backend for ``rerotate_keys`` and ``rerotate_keys_paged``: thin launchers over
``kvkernels._C.rerotate_keys`` / ``rerotate_keys_paged`` (csrc/blend.{h,cu}, python/blend.cpp). Same conventions as kvkernels/reference/blend.py:
``key`` ``[L, T, H, D]`` (head_dim dense, other strides arbitrary), int64 positions ``[T]``,
float32 ``cos_sin_cache`` ``[max_pos, rot_dim]``; fp8 keys with ``k_scale`` expanded to
``[L, T, H]`` (strides may be 0). Runs on torch's current stream; nothing synchronises.
"""
from __future__ import annotations

from typing import Optional

import torch

from .quant import _ext, available

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float8_e4m3fn: 3}
_MAX_HALF = 256


def supports(key: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool, k_scale) -> Optional[str]:
    why = available()
    if why:
        return why
    if key.device.type != "cuda":
        return f"the CUDA kernels need a CUDA tensor (got one on {key.device})"
    if key.dtype not in _DTYPE_CODE:
        return f"dtype {key.dtype} is not supported"
    if key.dim() != 4 or key.stride(-1) != 1:
        return "expects [L, T, H, D] with a dense head_dim"
    if cos_sin_cache.dtype != torch.float32:
        return f"cos_sin_cache must be float32 (got {cos_sin_cache.dtype})"
    if cos_sin_cache.shape[1] // 2 > _MAX_HALF:
        return f"rot_dim {cos_sin_cache.shape[1]} > {2 * _MAX_HALF}"
    if key.shape[0] * key.shape[1] > 2**31 - 1:
        return "more than 2^31 - 1 (layer, token) rows"
    return None


def rerotate_keys_into(key, old_pos, new_pos, cos_sin_cache, is_neox: bool, k_scale) -> None:
    L, T, H, D = key.shape
    cs = cos_sin_cache.contiguous()
    old = old_pos.contiguous()
    new = new_pos.contiguous()
    fp8 = key.dtype == torch.float8_e4m3fn
    ss = k_scale.stride() if fp8 else (0, 0, 0)
    stream = torch.cuda.current_stream(key.device).cuda_stream
    _ext().rerotate_keys(key.data_ptr(), _DTYPE_CODE[key.dtype], L, T, H, D, key.stride(0), key.stride(1),
                         key.stride(2), k_scale.data_ptr() if fp8 else 0, ss[0], ss[1], ss[2], old.data_ptr(),
                         new.data_ptr(), cs.data_ptr(), cs.shape[0], cs.shape[1] // 2, int(bool(is_neox)),
                         key.device.index or 0, stream)


_PAGED_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float8_e4m3fn: 3, torch.uint8: 3}


def supports_paged(layout, slots: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool) -> Optional[str]:
    why = available()
    if why:
        return why
    if not hasattr(_ext(), "rerotate_keys_paged"):
        return "kvkernels._C was built without rerotate_keys_paged (rebuild the extension)"
    if layout.device.type != "cuda":
        return f"the CUDA kernels need caches on a CUDA device (got {layout.device})"
    if layout.dtype not in _PAGED_CODE:
        return f"cache dtype {layout.dtype} is not supported"
    if cos_sin_cache.dtype != torch.float32:
        return f"cos_sin_cache must be float32 (got {cos_sin_cache.dtype})"
    if cos_sin_cache.shape[1] // 2 > _MAX_HALF:
        return f"rot_dim {cos_sin_cache.shape[1]} > {2 * _MAX_HALF}"
    return None


def rerotate_keys_paged_into(layout, slots, old_pos, new_pos, cos_sin_cache, is_neox: bool, k_scale) -> None:
    """``layout``: the K caches (``num_kv`` may be 1 or 2; the first ``L`` bases are written);
    ``slots``, positions: int64 ``[T]``; ``k_scale``: fp8 float32 ``[L, H]`` (strides may be 0)."""
    L, T = layout.num_layers, slots.shape[0]
    cs = cos_sin_cache.contiguous()
    sB, sT, sH, sDX, sDI = layout.strides[0]
    aligned = all(b.data_ptr() % 16 == 0 for b in layout.bases[:L])
    fp8 = layout.fp8
    ss = k_scale.stride() if fp8 else (0, 0)
    stream = torch.cuda.current_stream(layout.device).cuda_stream
    _ext().rerotate_keys_paged(layout.ptrs.data_ptr(), _PAGED_CODE[layout.dtype], L, T, layout.num_heads,
                               layout.head_dim, layout.num_blocks, layout.block_size, sB, sT, sH, sDX, sDI, layout.x,
                               int(aligned), slots.contiguous().data_ptr(), k_scale.data_ptr() if fp8 else 0, ss[0],
                               ss[1], old_pos.contiguous().data_ptr(), new_pos.contiguous().data_ptr(), cs.data_ptr(),
                               cs.shape[0], cs.shape[1] // 2, int(bool(is_neox)), layout.device.index or 0, stream)
