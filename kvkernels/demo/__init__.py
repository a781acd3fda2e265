"""The end-to-end knowledge-delivery run: ``python -m kvkernels.demo`` (``--help`` for options).

Steps (one function each in :mod:`kvkernels.demo.run`, calling the public API):

1. :func:`~kvkernels.demo.run.store_passages` -- prefill every passage of the knowledge base
   once and put its KV, compressed, in a :class:`kvkernels.LocalKVStore`.
2. :func:`~kvkernels.demo.run.answer_from_store` -- per question: load the passages' KV from the
   store, decode, blend (selective recompute) or reuse as is, generate the answer.
3. :func:`~kvkernels.demo.run.answer_full_prefill` -- the same question with the passages as
   text in the prompt (the reference), and plain KV reuse of the uncompressed caches.

:mod:`kvkernels.demo.report` prints the summary table, writes ``--json`` and ``--plot``.
"""
