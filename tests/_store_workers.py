"""Worker processes for tests/test_store.py (spawned: this module must import quickly).

kvkernels/store.py is loaded from its file, not through the package, so a worker does not
import torch (the package's __init__ does): spawning six workers stays cheap on a 2-core box.
"""
import hashlib
import importlib.util
import os
import random
import sys
import time
from pathlib import Path

_STORE_PY = Path(__file__).resolve().parents[1] / "kvkernels" / "store.py"


def load_store():
    spec = importlib.util.spec_from_file_location("_kvk_store_standalone", _STORE_PY)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def make_payload(key: str, writer: int, seq: int, rng: random.Random) -> bytes:
    """Self-describing payload: key, writer, sequence number, filler, then sha256 of all that."""
    body = f"{key}|{writer}|{seq}|".encode() + rng.randbytes(rng.randint(200, 12000))
    return body + hashlib.sha256(body).digest()


def payload_ok(key: str, data: bytes) -> bool:
    body, digest = data[:-32], data[-32:]
    return hashlib.sha256(body).digest() == digest and body.startswith(key.encode() + b"|")


def writer(root, keys, wid, seconds, max_bytes, q):
    st = load_store().LocalKVStore(root, max_bytes=max_bytes, check=None)
    rng, seq, t_end = random.Random(wid), 0, time.monotonic() + seconds
    while time.monotonic() < t_end:
        k = rng.choice(keys)
        st.put(k, make_payload(k, wid, seq, rng))
        seq += 1
    q.put(("writer", wid, seq, 0, 0))


def reader(root, keys, rid, seconds, on_corrupt, q):
    """Counts (hits, misses, bad): bad = bytes that are not a complete payload of that key, or a
    corrupt-entry error where none was injected (on_corrupt='raise')."""
    mod = load_store()
    st = mod.LocalKVStore(root, check=None, on_corrupt=on_corrupt)
    rng, t_end = random.Random(1000 + rid), time.monotonic() + seconds
    hits = misses = bad = 0
    while time.monotonic() < t_end:
        k = rng.choice(keys)
        try:
            data = st.get(k, None)
        except mod.StoreCorruptError:
            bad += 1
            continue
        if data is None:
            misses += 1
        elif payload_ok(k, data):
            hits += 1
        else:
            bad += 1
    q.put(("reader", rid, hits, misses, bad))


def mutator(root, key, seconds, q):
    """Cycles one entry through: good put, bytes flipped in place, truncated, deleted."""
    mod = load_store()
    st = mod.LocalKVStore(root, check=None)
    rng, t_end, n = random.Random(7), time.monotonic() + seconds, 0
    p = st.path_of(key)
    while time.monotonic() < t_end:
        st.put(key, make_payload(key, 99, n, rng))
        try:
            with open(p, "r+b") as f:  # corrupt in place (not atomically: a reader may see it mid-way)
                size = os.fstat(f.fileno()).st_size
                f.seek(rng.randrange(size))
                f.write(bytes([rng.randrange(256)]))
            with open(p, "r+b") as f:
                f.truncate(rng.randrange(os.fstat(f.fileno()).st_size))
            os.unlink(p)
        except FileNotFoundError:  # a reader quarantined it
            pass
        n += 1
    q.put(("mutator", 0, n, 0, 0))


def die_mid_write(root, key, stage, data):
    """put() that is killed (os._exit(7)) at ``stage`` of writing the temporary file."""
    mod = load_store()

    def hook(s, path):
        if s == stage:
            os._exit(7)

    mod._write_hook = hook
    mod.LocalKVStore(root, check=None).put(key, data)
    os._exit(0)
