"""``python -m kvkernels.integrations.lmcache.launch <lmcache server args>``.

Registers the ``kvkernels`` serde and ``kvkernels_fs`` L2 adapter in this process, then runs
LMCache's multi-process server exactly as ``lmcache server <args>`` would (same arguments,
same HTTP API). Example::

    python -m kvkernels.integrations.lmcache.launch --host 127.0.0.1 --port 5555 \\
        --l1-size-gb 8 --eviction-policy LRU \\
        --l2-adapter '{"type": "kvkernels_fs", "base_path": "/cache",
                       "serde": {"type": "kvkernels", "preset": "default", "head_dim": 128}}'
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from . import register

    register()
    from lmcache.cli.main import main as lmcache_main

    args = list(sys.argv[1:] if argv is None else argv)
    lmcache_main(["server", *args])


if __name__ == "__main__":
    main()
