"""Integrations of kvkernels into other systems (optional; each imports its host lazily).

* :mod:`kvkernels.integrations.lmcache` -- kvkernels' codec as an LMCache serde plugin.
"""
