"""``"type": "kvkernels_fs"``: LMCache's filesystem L2 adapter, loading objects of any size.

LMCache 0.5.6's ``FSL2Adapter`` writes exactly the bytes a serde produced but loads only files
that fill the whole temp buffer (the serde's size estimate); a shorter file is reported as
"Incomplete read" and a miss, so a compressing serde never loads back. This subclass keeps
the ``fs`` adapter's configuration (``base_path``, ``relative_tmp_dir``, ...), file naming,
store, lookup and delete, and replaces only the load: a file of 1 to ``len(buffer)`` bytes is
read into the buffer's prefix (the serde checks the length it finds in the payload itself);
a larger or empty file is a miss. ``use_odirect``/``read_ahead_size`` do not apply to loads.
"""
from __future__ import annotations

import logging
import os

ADAPTER_NAME = "kvkernels_fs"
log = logging.getLogger(__name__)


def _read_prefix(path, buf) -> int:
    """Read the whole file at ``path`` into the start of ``buf``; its length, or -1 if it does not fit."""
    mv = memoryview(buf).cast("B")
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0 or size > len(mv):
            log.warning("kvkernels_fs: %s has %d bytes, the buffer %d: miss", path, size, len(mv))
            return -1
        total = 0
        while total < size:
            r = f.readinto(mv[total:size])
            if not r:
                break
            total += r
    return total if total == size else -1


def make_classes():
    """(config class, adapter class); LMCache maps a config's exact class back to its type name."""
    from lmcache.lmcache_native import Bitmap
    from lmcache.v1.distributed.l2_adapters.fs_l2_adapter import FSL2Adapter, FSL2AdapterConfig

    class KVKernelsFSL2AdapterConfig(FSL2AdapterConfig):
        @classmethod
        def help(cls) -> str:
            return ("kvkernels_fs L2 adapter: the fs adapter loading variable-size serde payloads.\n"
                    + FSL2AdapterConfig.help())

    class KVKernelsFSL2Adapter(FSL2Adapter):
        async def _execute_load(self, keys, objects, task_id) -> None:
            bitmap = Bitmap(len(keys))
            for i, key in enumerate(keys):
                path = self._key_to_path(key)
                try:
                    n = await self._loop.run_in_executor(None, _read_prefix, path, objects[i].byte_array)
                except FileNotFoundError:
                    continue
                except Exception:  # noqa: BLE001 -- a failed read is a miss, as in FSL2Adapter
                    log.exception("kvkernels_fs: failed to load %s", path)
                    continue
                if n > 0:
                    bitmap.set(i)
            loaded = [keys[i] for i in bitmap.get_indices_list()]
            if loaded:
                self._notify_keys_accessed(loaded)
            with self._lock:
                self._completed_load_tasks[task_id] = bitmap
            self._load_efd.notify()

    return KVKernelsFSL2AdapterConfig, KVKernelsFSL2Adapter
