"""kvkernels: GPU kernels for delivering knowledge to LLMs as KV caches.

Public API (shapes and layouts in each docstring):

* :func:`quantize` / :func:`dequantize` -- fused KV quantization (int8/int4/int2 group-wise,
  fp8 e4m3 with scales), formats as values (:class:`QuantFormat`), results as
  :class:`QuantizedKV`.

Backends: ``cuda`` (the compiled extension ``kvkernels._C``), ``triton``, ``torch`` (the
reference). ``backend=`` or ``KVKERNELS_BACKEND`` overrides the automatic choice.
"""
from .dispatch import BACKENDS, BackendError, backend_report
from .formats import QuantFormat, QuantizedKV
from .quant import dequantize, quantize
from . import codec  # noqa: E402  (kvkernels.codec: encode/decode/inspect/verify)
from .codec import coders as _codec_coders  # noqa: F401  (registers the entropy-coder ops)

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendError", "QuantFormat", "QuantizedKV", "backend_report", "dequantize",
           "quantize", "__version__", "codec"]
