"""kvkernels: GPU kernels for delivering knowledge to LLMs as KV caches.

Public API (shapes and layouts in each docstring):

* :func:`quantize` / :func:`dequantize` -- fused KV quantization (int8/int4/int2 group-wise,
  fp8 e4m3 with scales), formats as values (:class:`QuantFormat`), results as
  :class:`QuantizedKV`.
* :func:`scatter` / :func:`gather` -- flat or quantized KV of all layers to / from serving
  engines' paged caches, described by :class:`PagedLayout` (vLLM, FlashInfer, SGLang, MLA,
  cross-layer; docs/paged.md), addressed by ``slot_mapping`` or a :class:`PageTable`.
* :class:`LocalKVStore` (a :class:`KVStore`) and :func:`store_key` -- the on-disk,
  content-addressed store of compressed KV caches (:mod:`kvkernels.store`).

Backends: ``cuda`` (the compiled extension ``kvkernels._C``), ``triton``, ``torch`` (the
reference). ``backend=`` or ``KVKERNELS_BACKEND`` overrides the automatic choice.
"""
from .dispatch import BACKENDS, BackendError, backend_report
from .formats import QuantFormat, QuantizedKV
from .quant import dequantize, quantize
from .layouts import PagedLayout, PageTable
from .paged import gather, scatter
from . import codec  # noqa: F401  (kvkernels.codec: encode/decode/inspect/verify)
from .codec import coders as _codec_coders  # noqa: F401  (registers the entropy-coder ops)
from .blend import rerotate_keys, select_tokens
from .blend import gather_tokens, rerotate_keys_paged, scatter_tokens
from .store import KVStore, LocalKVStore, StoreCorruptError, store_key

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendError", "QuantFormat", "QuantizedKV", "backend_report", "dequantize",
           "quantize", "__version__",
           "PagedLayout", "PageTable", "gather", "scatter", "rerotate_keys", "select_tokens", "codec"]
__all__ += ["rerotate_keys_paged", "gather_tokens", "scatter_tokens"]
__all__ += ["KVStore", "LocalKVStore", "StoreCorruptError", "store_key"]
