"""Blending the KV caches of separately prefilled texts (CacheBlend-style selective recompute).

* :func:`rerotate_keys`, :func:`rerotate_keys_paged`, :func:`select_tokens`, :func:`gather_tokens`,
  :func:`scatter_tokens` -- the registered ops (``ops.py``).
* :class:`Blender` -- end-to-end blend for HF Llama-family models (``hf.py``; imports
  ``transformers`` on first use).
"""
from .ops import (Selection, cos_sin_cache_from_inv_freq, gather_tokens, rerotate_keys, rerotate_keys_paged,
                  scatter_tokens, select_tokens)

__all__ = ["Blender", "BlendResult", "ChunkCache", "Selection", "cos_sin_cache_from_inv_freq", "rerotate_keys",
           "rerotate_keys_paged", "select_tokens", "gather_tokens", "scatter_tokens"]


def __getattr__(name):
    if name in ("Blender", "BlendResult", "ChunkCache"):
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
