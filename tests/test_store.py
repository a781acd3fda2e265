"""kvkernels.store: keys, framing checks, corruption, eviction, atomicity, several processes."""
import hashlib
import multiprocessing as mp
import os
import random
import struct
import time

import pytest
import torch

import _store_workers as W
from kvkernels import store as S
from kvkernels.store import KVStore, LocalKVStore, StoreCorruptError, store_key


def _store(tmp_path, **kw):
    kw.setdefault("check", None)
    return LocalKVStore(tmp_path / "kv", **kw)


# -- keys ----------------------------------------------------------------------------------------
def test_store_key_is_sha256_of_the_canonical_encoding():
    ids = [1, 2, 50000, 7]
    h = hashlib.sha256(b"kvkernels-kv-v1\0")
    for s in ("SmolLM2-135M", "default"):
        h.update(struct.pack("<I", len(s.encode())) + s.encode())
    h.update(struct.pack("<Q", 4) + struct.pack("<4Q", *ids))
    assert store_key("SmolLM2-135M", "default", ids) == h.hexdigest()
    # same key from a tensor, a [1, T] tensor and a tuple; different for any field
    assert store_key("SmolLM2-135M", "default", torch.tensor(ids)) == h.hexdigest()
    assert store_key("SmolLM2-135M", "default", torch.tensor([ids])) == h.hexdigest()
    assert store_key("SmolLM2-135M", "default", tuple(ids)) == h.hexdigest()
    others = {store_key("m", "default", ids), store_key("SmolLM2-135M", "int4", ids),
              store_key("SmolLM2-135M", "default", ids[:-1]), store_key("SmolLM2-135M", "default", ids[::-1]),
              store_key("SmolLM2-135M", "default", [])}
    assert h.hexdigest() not in others and len(others) == 5
    # no ambiguity between fields: ("ab", "c") vs ("a", "bc")
    assert store_key("ab", "c", ids) != store_key("a", "bc", ids)


@pytest.mark.parametrize("args, exc", [((1, "p", [1]), TypeError), (("m", None, [1]), TypeError),
                                       (("m", "p", "abc"), TypeError), (("m", "p", [1.0]), TypeError),
                                       (("m", "p", [-1]), ValueError), (("m", "p", torch.zeros(2, 2, dtype=torch.long)), ValueError),
                                       (("m", "p", torch.zeros(3)), TypeError), (("m", "p", [True]), TypeError)])
def test_store_key_rejects_bad_input(args, exc):
    with pytest.raises(exc):
        store_key(*args)


def test_bad_keys_and_arguments(tmp_path):
    st = _store(tmp_path)
    for k in ("", "../x", ".hidden", "a/b", "x" * 129, "é"):
        with pytest.raises(ValueError, match="key"):
            st.put(k, b"x")
    with pytest.raises(TypeError, match="key"):
        st.get(5)
    with pytest.raises(TypeError, match="data"):
        st.put("k", "not bytes")
    with pytest.raises(ValueError, match="max_bytes"):
        LocalKVStore(tmp_path / "b", max_bytes=0)
    with pytest.raises(ValueError, match="on_corrupt"):
        LocalKVStore(tmp_path / "b", on_corrupt="ignore")
    with pytest.raises(TypeError, match="check"):
        LocalKVStore(tmp_path / "b", check=3)
    assert issubclass(StoreCorruptError, ValueError) and isinstance(st, KVStore)


# -- basic behaviour -------------------------------------------------------------------------------
def test_put_get_contains_delete_stats(tmp_path):
    st = _store(tmp_path)
    k = store_key("m", "p", [1, 2, 3])
    with pytest.raises(KeyError):
        st.get(k)
    assert st.get(k, None) is None and not st.contains(k) and k not in st
    data = os.urandom(5000)
    st.put(k, data)
    assert st.contains(k) and st.get(k) == data
    st.put(k, b"")  # replace; empty payloads are valid
    assert st.get(k) == b""
    s = st.stats()
    assert (s.entries, s.hits, s.misses, s.puts) == (1, 2, 2, 2) and s.hit_rate == 0.5
    assert s.bytes == os.path.getsize(st.path_of(k)) and s.as_dict()["hit_rate"] == 0.5
    assert st.keys() == [k]
    assert st.delete(k) and not st.delete(k) and st.stats().entries == 0
    # a second object on the same directory sees the entries but counts its own hits
    st.put(k, data)
    other = LocalKVStore(st.root, check=None)
    assert other.get(k) == data and other.stats().hits == 1 and st.stats().hits == 2


def test_default_check_is_the_codec_verify_when_importable(tmp_path):
    st = LocalKVStore(tmp_path / "a")
    try:
        from kvkernels.codec import verify
    except Exception:
        assert st.check is None
    else:
        assert st.check is verify


def test_check_callable_rejects_payloads(tmp_path):
    def check(b):
        if not b.startswith(b"OK"):
            raise ValueError("not a container")

    st = _store(tmp_path, check=check)
    st.put("good", b"OK data")
    st.put("bad", b"garbage")
    assert st.get("good") == b"OK data"
    with pytest.raises(StoreCorruptError, match="fails its check: not a container"):
        st.get("bad")
    assert st.get("bad", None, on_corrupt="miss") is None and not st.contains("bad")


# -- corruption ------------------------------------------------------------------------------------
def _corrupt(path, how, rng):
    blob = bytearray(path.read_bytes())
    if how == "flip":
        i = rng.randrange(len(blob))
        blob[i] ^= 1 << rng.randrange(8)
    elif how == "truncate":
        blob = blob[:rng.randrange(len(blob))]
    elif how == "extend":
        blob += b"\0"
    elif how == "magic":
        blob[:8] = b"NOTSTORE"
    elif how == "empty":
        blob = bytearray()
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize("how, msg", [("flip", "store entry"), ("truncate", "truncated|checksum|magic|holds key"),
                                      ("extend", "trailing"), ("magic", "bad magic"), ("empty", "truncated")])
def test_corrupt_entries_raise_or_miss(tmp_path, how, msg):
    rng = random.Random(how)
    st = _store(tmp_path)
    for trial in range(20):
        k = f"key{trial}"
        data = os.urandom(rng.randint(1, 3000))
        st.put(k, data)
        _corrupt(st.path_of(k), how, rng)
        with pytest.raises(StoreCorruptError, match=msg):
            st.get(k)
        with pytest.raises(StoreCorruptError):
            st.get(k, None)  # a default covers misses, not corruption, unless on_corrupt="miss"
        assert st.get(k, "fallback", on_corrupt="miss") == "fallback"
        assert not st.contains(k)  # quarantined
        with pytest.raises(KeyError):
            st.get(k)
    assert len(list((st.root / "quarantine").iterdir())) == 20
    assert st.stats().corrupt == 60


def test_misplaced_entry_is_detected(tmp_path):
    st = _store(tmp_path)
    st.put("aaaa", b"payload of aaaa")
    os.makedirs(st.path_of("bbbb").parent, exist_ok=True)
    os.replace(st.path_of("aaaa"), st.path_of("bbbb"))
    with pytest.raises(StoreCorruptError, match="foreign or misplaced"):
        st.get("bbbb")


def test_store_on_corrupt_miss_policy(tmp_path):
    st = _store(tmp_path, on_corrupt="miss")
    st.put("k", b"x" * 100)
    _corrupt(st.path_of("k"), "flip", random.Random(0))
    with pytest.raises(KeyError):
        st.get("k")
    st.put("k", b"y")
    assert st.get("k") == b"y"


# -- eviction --------------------------------------------------------------------------------------
def test_lru_eviction_order_by_access(tmp_path):
    one = len(S.frame("a", b"\0" * 1000))
    st = _store(tmp_path, max_bytes=3 * one)
    for k in "abc":
        st.put(k, k.encode() * 1000)
        time.sleep(0.01)
    st.get("a")  # a is now more recent than b and c
    time.sleep(0.01)
    st.put("d", b"d" * 1000)
    assert st.keys() == ["a", "c", "d"]
    time.sleep(0.01)
    st.get("c")
    time.sleep(0.01)
    st.put("e", b"e" * 1000)
    assert st.keys() == ["c", "d", "e"]
    s = st.stats()
    assert s.evictions == 2 and s.bytes == 3 * one
    # contains() does not count as a use
    time.sleep(0.01)
    assert st.contains("d")
    st.put("f", b"f" * 1000)
    assert st.keys() == ["c", "e", "f"]


def test_size_bound_holds_under_random_puts(tmp_path):
    rng = random.Random(3)
    st = _store(tmp_path, max_bytes=50_000, fsync=False)
    for i in range(200):
        k = f"k{rng.randrange(40)}"
        st.put(k, os.urandom(rng.randint(0, 9000)))
        if rng.random() < 0.3:
            st.get(f"k{rng.randrange(40)}", None)
        s = st.stats()
        assert s.bytes <= 50_000 and st.contains(k)  # the entry just written survives its own eviction
    with pytest.raises(ValueError, match="exceeds max_bytes"):
        st.put("big", b"\0" * 50_000)
    assert not st.contains("big")


def test_reader_with_open_file_survives_eviction(tmp_path):
    one = len(S.frame("a", b"\0" * 4000))
    st = _store(tmp_path, max_bytes=one)
    data = os.urandom(4000)
    st.put("a", data)
    with open(st.path_of("a"), "rb") as f:
        head = f.read(10)
        st.put("b", os.urandom(4000))  # evicts a while the file is open
        assert not st.contains("a")
        assert S.unframe("a", head + f.read()) == data


# -- atomicity: a writer killed mid-write ----------------------------------------------------------
@pytest.mark.parametrize("stage", ["partial", "written"])
def test_writer_killed_mid_write_leaves_no_entry(tmp_path, stage):
    ctx = mp.get_context("spawn")
    root = str(tmp_path / "kv")
    st = LocalKVStore(root, check=None)
    st.put("old", b"old version")
    for key in ("new", "old"):
        p = ctx.Process(target=W.die_mid_write, args=(root, key, stage, os.urandom(100_000)))
        p.start()
        p.join(60)
        assert p.exitcode == 7
    assert not st.contains("new")
    with pytest.raises(KeyError):
        st.get("new")
    assert st.get("old") == b"old version"  # the previous entry is intact
    assert st.keys() == ["old"] and st.stats().entries == 1
    leftovers = [f for d in st.root.iterdir() if d.is_dir() for f in d.iterdir() if f.name.startswith(".tmp-")]
    assert len(leftovers) == 2  # hidden temporary files, never read; swept by eviction after an hour
    for f in leftovers:
        os.utime(f, (time.time() - 7200, time.time() - 7200))
    LocalKVStore(root, max_bytes=1 << 20, check=None).put("x", b"x")
    assert not any(f.exists() for f in leftovers)


# -- several processes -----------------------------------------------------------------------------
def _run(ctx, procs, q, timeout=90):
    for p in procs:
        p.start()
    res = [q.get(timeout=timeout) for _ in procs]
    for p in procs:
        p.join(timeout)
        assert p.exitcode == 0
    return res


@pytest.mark.parametrize("max_bytes", [None, 40_000])
def test_many_writers_and_readers_same_keys(tmp_path, max_bytes):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    root, keys, secs = str(tmp_path / "kv"), [store_key("m", "p", [i]) for i in range(4)], 1.5
    procs = [ctx.Process(target=W.writer, args=(root, keys, i, secs, max_bytes, q)) for i in range(3)]
    procs += [ctx.Process(target=W.reader, args=(root, keys, i, secs, "raise", q)) for i in range(3)]
    res = _run(ctx, procs, q)
    writes = sum(r[2] for r in res if r[0] == "writer")
    hits = sum(r[2] for r in res if r[0] == "reader")
    bad = sum(r[4] for r in res if r[0] == "reader")
    assert bad == 0, f"{bad} reads returned bytes that were not a complete payload of the key"
    assert writes > 20 and hits > 20, (writes, hits)
    st = LocalKVStore(root, check=None)
    for k in st.keys():
        assert W.payload_ok(k, st.get(k))
    if max_bytes:
        assert st.stats().bytes <= max_bytes


def test_readers_under_corruption_truncation_and_deletion(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    root, key, secs = str(tmp_path / "kv"), store_key("m", "p", [42]), 1.5
    procs = [ctx.Process(target=W.mutator, args=(root, key, secs, q))]
    procs += [ctx.Process(target=W.reader, args=(root, [key], i, secs, "miss", q)) for i in range(2)]
    res = _run(ctx, procs, q)
    cycles = next(r[2] for r in res if r[0] == "mutator")
    readers = [r for r in res if r[0] == "reader"]
    assert cycles > 5
    assert sum(r[4] for r in readers) == 0  # never wrong bytes: a good payload or a miss
    assert sum(r[2] + r[3] for r in readers) > 20
