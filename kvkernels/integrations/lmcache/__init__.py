"""kvkernels as an LMCache plugin (``pip install "kvkernels[lmcache]"``).

:func:`register` adds, in the calling process (LMCache has no entry point for serdes):

* the serde ``"kvkernels"`` (:mod:`.serde`): ``--l2-adapter '{"type": "kvkernels_fs",
  "base_path": "/cache", "serde": {"type": "kvkernels", "preset": "default"}}'``;
* the L2 adapter ``"kvkernels_fs"`` (:mod:`.fs_adapter`): LMCache's ``fs`` adapter that loads
  variable-size serde payloads (LMCache 0.5.6's ``fs`` cannot).

``python -m kvkernels.integrations.lmcache.launch <lmcache server args>`` registers both and
runs ``lmcache server`` (:mod:`.launch`). Importing this package does not import LMCache.
"""
from __future__ import annotations

from .frame import HEADER_BYTES, FrameError
from .serde import SERDE_NAME, KVKernelsDeserializer, KVKernelsSerializer, make_serde
from .fs_adapter import ADAPTER_NAME

TESTED_LMCACHE = "0.5.6"

__all__ = ["ADAPTER_NAME", "FrameError", "HEADER_BYTES", "KVKernelsDeserializer", "KVKernelsSerializer",
           "SERDE_NAME", "TESTED_LMCACHE", "make_serde", "register"]


def register() -> None:
    """Register the ``kvkernels`` serde and the ``kvkernels_fs`` L2 adapter with LMCache (idempotent)."""
    from lmcache.v1.distributed.serde import get_registered_serde_types, register_serde_factory
    from lmcache.v1.distributed.l2_adapters import config as l2_config
    from lmcache.v1.distributed.l2_adapters import factory as l2_factory
    from .fs_adapter import make_classes

    if SERDE_NAME not in get_registered_serde_types():
        register_serde_factory(SERDE_NAME, make_serde)
    # The registries raise ValueError for a name taken; their listing helpers import every adapter.
    if ADAPTER_NAME in l2_config._L2_ADAPTER_CONFIG_REGISTRY:
        return
    config_cls, cls = make_classes()
    l2_config.register_l2_adapter_type(ADAPTER_NAME, config_cls)
    try:
        l2_factory.register_l2_adapter_factory(ADAPTER_NAME, lambda config, l1_memory_desc=None: cls(config))
    except ValueError:
        pass
