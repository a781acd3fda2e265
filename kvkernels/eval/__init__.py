"""Model-quality evaluation: perplexity of a real model with its KV cache quantized.

See :mod:`kvkernels.eval.ppl` (``python -m kvkernels.eval.ppl``) and ``docs/model-quality.md``.
"""
