"""KV stores: where compressed KV caches (codec containers) live between prefill and reuse.

* :class:`KVStore` -- the interface (``put`` / ``get`` / ``contains`` / ``delete`` / ``stats``)
  over opaque ``bytes`` values, so an integration (e.g. LMCache's tiers) can hold the same bytes.
* :class:`LocalKVStore` -- the embedded default: one file per entry in a local directory.
* :func:`store_key` -- the content address of a KV cache: sha256 of a canonical encoding of
  (model, preset, token ids).

``LocalKVStore`` guarantees, for any number of threads and processes sharing one directory:

* **Atomic entries.** A writer writes a temporary file in the entry's own directory, flushes and
  fsyncs it, ``os.replace``-s it onto the entry's name and fsyncs the directory. A reader sees
  either no entry or a complete one, never a partial one (a writer killed mid-write leaves only
  a hidden ``.tmp-*`` file, which is never read and is swept after an hour).
* **Every read is checked.** An entry file is ``MAGIC | key | payload length | blake2b digest |
  payload``; ``get`` checks all of it, then runs the ``check`` callable on the payload (by
  default :func:`kvkernels.codec.verify` when the codec is importable: every container
  checksum). A missing entry raises :class:`KeyError`; a truncated, corrupted or foreign one
  raises :class:`StoreCorruptError` (a ``ValueError``). With ``on_corrupt="miss"`` a corrupt
  entry is moved to ``<root>/quarantine/`` and reported as a miss, so the caller falls back to
  prefill; ``get(key, default)`` returns ``default`` on a miss instead of raising.
* **Size bound.** With ``max_bytes``, each ``put`` evicts least-recently-used entries (by access
  time, which ``get`` sets explicitly with ``os.utime`` on every hit, whatever the mount's
  atime policy) until the files fit. Eviction unlinks files: a reader that already opened one
  keeps reading it (POSIX), a later reader gets a miss.

Keys are strings of 1-128 characters from ``[A-Za-z0-9_.-]`` not starting with ``.``
(:func:`store_key` gives 64 hex digits).
"""
from __future__ import annotations

import abc
import dataclasses
import errno
import hashlib
import os
import re
import struct
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

__all__ = ["KVStore", "LocalKVStore", "StoreCorruptError", "StoreStats", "store_key"]

MAGIC = b"KVKSTOR1"
# MAGIC | u16 key length | key (ascii) | u64 payload length | 32-byte blake2b(header fields + payload)
_HEAD = struct.Struct("<8sH")
_LEN = struct.Struct("<Q")
_DIGEST = 32
_KEY_RE = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,127}\Z")
_SUFFIX = ".kv"
_TMP_PREFIX = ".tmp-"
_TMP_MAX_AGE_S = 3600.0
_MISSING = object()

# Test hook: called as ``_write_hook(stage, path)`` during a put ("partial": half the file is
# written to the temporary file; "written": all of it, before the rename). Tests set it in a
# subprocess that then dies with os._exit, to show that no partial entry becomes visible.
_write_hook: Optional[Callable[[str, str], None]] = None


class StoreCorruptError(ValueError):
    """An entry exists but is truncated, corrupted, foreign, or fails the store's ``check``."""


@dataclasses.dataclass
class StoreStats:
    """Counters of this store object (this process) and the state of the store on disk.

    ``hits`` / ``misses`` / ``corrupt`` / ``puts`` / ``evictions`` count this object's calls;
    ``entries`` / ``bytes`` are what is on disk now (all processes' entries, file sizes with
    framing); ``hit_rate`` = hits / (hits + misses), 0.0 before any ``get``.
    """

    entries: int
    bytes: int
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    puts: int = 0
    evictions: int = 0
    max_bytes: Optional[int] = None

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "hit_rate": self.hit_rate}


def store_key(model: str, preset: str, token_ids: Union[Sequence[int], Any]) -> str:
    """Content address of the KV cache of ``token_ids`` under ``model`` and codec ``preset``.

    ``token_ids``: a sequence of non-negative ints, or a 1-D / ``[1, T]`` integer tensor or
    array. Returns 64 lowercase hex digits: sha256 of ``b"kvkernels-kv-v1\\0"``, then model and
    preset as u32-length-prefixed UTF-8, then the token count (u64) and every id as u64, all
    little-endian -- the same key for the same tokens whatever container they came in.
    """
    if not isinstance(model, str):
        raise TypeError(f"model must be a str, got {type(model).__name__}")
    if not isinstance(preset, str):
        raise TypeError(f"preset must be a str, got {type(preset).__name__}")
    if hasattr(token_ids, "tolist"):  # torch tensor / numpy array
        shape = tuple(getattr(token_ids, "shape", ()))
        if len(shape) == 2 and shape[0] == 1:
            token_ids = token_ids[0]
        elif len(shape) != 1:
            raise ValueError(f"token_ids must be 1-D or [1, T], got shape {shape}")
        dtype = str(getattr(token_ids, "dtype", ""))
        if "int" not in dtype:
            raise TypeError(f"token_ids must hold integers, got dtype {dtype}")
        token_ids = token_ids.tolist()
    elif isinstance(token_ids, (str, bytes)):
        raise TypeError("token_ids must be a sequence of ints, not a string")
    ids = list(token_ids)
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int):
            raise TypeError(f"token_ids must be ints, got {type(t).__name__}")
        if not 0 <= t < 2**63:
            raise ValueError(f"token_ids must be non-negative 63-bit ints, got {t}")
    h = hashlib.sha256(b"kvkernels-kv-v1\0")
    for s in (model, preset):
        b = s.encode("utf-8")
        h.update(struct.pack("<I", len(b)) + b)
    h.update(struct.pack("<Q", len(ids)))
    h.update(struct.pack(f"<{len(ids)}Q", *ids))
    return h.hexdigest()


class KVStore(abc.ABC):
    """Interface of a KV store: opaque ``bytes`` values under string keys (see :func:`store_key`).

    Implementations must make ``put`` atomic (a concurrent ``get`` sees the old entry, the new
    one or none) and ``get`` must never return bytes other than those ``put`` under the key.
    """

    @abc.abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` (bytes-like) under ``key``, replacing any entry."""

    @abc.abstractmethod
    def get(self, key: str, default: Any = _MISSING) -> bytes:
        """The bytes under ``key``; ``KeyError`` on a miss unless ``default`` is given;
        :class:`StoreCorruptError` for an entry that fails its checks."""

    @abc.abstractmethod
    def contains(self, key: str) -> bool:
        """Whether an entry exists (not checked: a later ``get`` may still find it corrupt)."""

    @abc.abstractmethod
    def delete(self, key: str) -> bool:
        """Remove the entry; True if one was removed."""

    @abc.abstractmethod
    def stats(self) -> StoreStats:
        """Counters and size (see :class:`StoreStats`)."""

    def __contains__(self, key: str) -> bool:
        return self.contains(key)


def _default_check() -> Optional[Callable[[bytes], Any]]:
    try:
        from kvkernels.codec import verify  # type: ignore[attr-defined]
    except Exception:  # codec not importable: framing checks only
        return None
    return verify


def _check_key(key: Any) -> str:
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {type(key).__name__}")
    if not _KEY_RE.match(key):
        raise ValueError(f"key must be 1-128 characters of [A-Za-z0-9_.-] not starting with '.', got {key!r}")
    return key


def frame(key: str, payload: bytes) -> bytes:
    """The file image of an entry: header, digest, payload (see the module docstring)."""
    kb = key.encode("ascii")
    head = _HEAD.pack(MAGIC, len(kb)) + kb + _LEN.pack(len(payload))
    digest = hashlib.blake2b(head, digest_size=_DIGEST)
    digest.update(payload)
    return head + digest.digest() + bytes(payload)


def unframe(key: str, blob: bytes) -> bytes:
    """The payload of an entry's file image; :class:`StoreCorruptError` saying what is wrong."""
    n = len(blob)
    if n < _HEAD.size:
        raise StoreCorruptError(f"store entry {key}: truncated ({n} bytes, shorter than its header)")
    magic, klen = _HEAD.unpack_from(blob, 0)
    if magic != MAGIC:
        raise StoreCorruptError(f"store entry {key}: bad magic {magic!r} (not a kvkernels store entry)")
    pos = _HEAD.size + klen
    if n < pos + _LEN.size + _DIGEST:
        raise StoreCorruptError(f"store entry {key}: truncated ({n} bytes, shorter than its header)")
    stored_key = blob[_HEAD.size:pos]
    if stored_key != key.encode("ascii"):
        raise StoreCorruptError(f"store entry {key}: holds key {stored_key[:64]!r} (a foreign or misplaced file)")
    (plen,) = _LEN.unpack_from(blob, pos)
    pos += _LEN.size
    want = pos + _DIGEST + plen
    if n != want:
        what = "truncated" if n < want else "has trailing bytes"
        raise StoreCorruptError(f"store entry {key}: {what} ({n} bytes, header says {want})")
    digest = hashlib.blake2b(blob[:pos], digest_size=_DIGEST)
    payload = memoryview(blob)[pos + _DIGEST:]
    digest.update(payload)
    if digest.digest() != blob[pos:pos + _DIGEST]:
        raise StoreCorruptError(f"store entry {key}: checksum mismatch (corrupted)")
    return bytes(payload)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class LocalKVStore(KVStore):
    """Content-addressed store in the local directory ``path`` (created if missing).

    ``max_bytes``: bound on the entries' total file size (framing included), enforced after each
    ``put`` by evicting least-recently-used entries; None: unbounded. ``check``: callable run on
    every payload read (raise to reject it); ``"auto"`` (default): :func:`kvkernels.codec.verify`
    if importable, else none; None: framing checks only. ``on_corrupt``: ``"raise"`` (default,
    :class:`StoreCorruptError`) or ``"miss"`` (quarantine the entry and report a miss).
    ``fsync``: False skips the fsyncs (faster, atomic but not durable across a power loss).

    Layout: ``<path>/<key[:2]>/<key>.kv``; ``<path>/quarantine/`` for rejected entries.
    Safe to share between threads and processes; each object counts its own hits and misses.
    """

    def __init__(self, path: Union[str, os.PathLike], max_bytes: Optional[int] = None, *,
                 check: Any = "auto", on_corrupt: str = "raise", fsync: bool = True):
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0):
            raise ValueError(f"max_bytes must be a positive int or None, got {max_bytes!r}")
        if on_corrupt not in ("raise", "miss"):
            raise ValueError(f"on_corrupt must be 'raise' or 'miss', got {on_corrupt!r}")
        if check == "auto":
            check = _default_check()
        elif check is not None and not callable(check):
            raise TypeError(f"check must be callable, None or 'auto', got {type(check).__name__}")
        self.root = Path(path).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.check, self.on_corrupt, self.fsync = max_bytes, check, on_corrupt, fsync
        self._n = dict(hits=0, misses=0, corrupt=0, puts=0, evictions=0)

    def __repr__(self) -> str:
        return f"LocalKVStore({str(self.root)!r}, max_bytes={self.max_bytes})"

    # -- paths ---------------------------------------------------------------------------
    def path_of(self, key: str) -> Path:
        """The file of ``key``'s entry (whether or not it exists)."""
        key = _check_key(key)
        return self.root / key[:2] / (key + _SUFFIX)

    def _entry_files(self) -> Iterator[os.DirEntry]:
        try:
            subdirs = list(os.scandir(self.root))
        except FileNotFoundError:
            return
        for d in subdirs:
            if d.name == "quarantine" or d.name.startswith(".") or not d.is_dir(follow_symlinks=False):
                continue
            try:
                files = list(os.scandir(d.path))
            except FileNotFoundError:
                continue
            for f in files:
                if f.name.endswith(_SUFFIX) and not f.name.startswith("."):
                    yield f

    def keys(self) -> list:
        """Keys of the entries on disk now (unchecked)."""
        return sorted(f.name[:-len(_SUFFIX)] for f in self._entry_files())

    # -- KVStore -------------------------------------------------------------------------
    def put(self, key: str, data: bytes) -> None:
        p = self.path_of(key)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes-like, got {type(data).__name__}")
        blob = frame(key, bytes(data))
        if self.max_bytes is not None and len(blob) > self.max_bytes:
            raise ValueError(f"data: entry of {len(blob)} bytes (with framing) exceeds max_bytes={self.max_bytes}")
        p.parent.mkdir(exist_ok=True)
        tmp = p.parent / f"{_TMP_PREFIX}{os.getpid()}-{os.urandom(6).hex()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                half = len(blob) // 2
                f.write(blob[:half])
                if _write_hook is not None:
                    f.flush()
                    _write_hook("partial", str(tmp))
                f.write(blob[half:])
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            if _write_hook is not None:
                _write_hook("written", str(tmp))
            os.replace(tmp, p)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        if self.fsync:
            _fsync_dir(p.parent)
        self._touch(p)
        self._n["puts"] += 1
        if self.max_bytes is not None:
            self._evict(keep=p)

    def get(self, key: str, default: Any = _MISSING, *, on_corrupt: Optional[str] = None) -> bytes:
        """The payload under ``key``, checked (see the class docstring).

        ``default``: returned on a miss instead of raising ``KeyError``. ``on_corrupt``
        overrides the store's policy for this call.
        """
        p = self.path_of(key)
        policy = on_corrupt or self.on_corrupt
        if policy not in ("raise", "miss"):
            raise ValueError(f"on_corrupt must be 'raise' or 'miss', got {policy!r}")
        try:
            f = open(p, "rb")
        except FileNotFoundError:
            return self._miss(key, default)
        with f:
            st = os.fstat(f.fileno())
            blob = f.read()
        try:
            payload = unframe(key, blob)
            if self.check is not None:
                try:
                    self.check(payload)
                except Exception as e:
                    raise StoreCorruptError(f"store entry {key}: payload fails its check: {e}") from e
        except StoreCorruptError:
            self._n["corrupt"] += 1
            if policy == "raise":
                raise
            self._quarantine(p, st)
            return self._miss(key, default)
        self._n["hits"] += 1
        self._touch(p)
        return payload

    def contains(self, key: str) -> bool:
        return self.path_of(key).is_file()

    def delete(self, key: str) -> bool:
        try:
            os.unlink(self.path_of(key))
            return True
        except FileNotFoundError:
            return False

    def stats(self) -> StoreStats:
        entries = total = 0
        for f in self._entry_files():
            try:
                total += f.stat(follow_symlinks=False).st_size
                entries += 1
            except FileNotFoundError:
                pass
        return StoreStats(entries=entries, bytes=total, max_bytes=self.max_bytes, **self._n)

    def clear(self) -> int:
        """Delete every entry; the number deleted."""
        n = 0
        for f in self._entry_files():
            try:
                os.unlink(f.path)
                n += 1
            except FileNotFoundError:
                pass
        return n

    # -- internals -----------------------------------------------------------------------
    def _miss(self, key, default):
        self._n["misses"] += 1
        if default is _MISSING:
            raise KeyError(key)
        return default

    @staticmethod
    def _touch(p: Path) -> None:
        """Set the access time to now (LRU order), keeping the modification time."""
        try:
            st = os.stat(p)
            os.utime(p, ns=(time.time_ns(), st.st_mtime_ns))
        except FileNotFoundError:  # evicted or replaced meanwhile
            pass

    def _quarantine(self, p: Path, st: os.stat_result) -> None:
        """Move the corrupt file we read aside -- only if it is still the same file (a writer may
        have replaced it with a good entry since we opened it)."""
        try:
            now = os.stat(p)
        except FileNotFoundError:
            return
        if (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev):
            return
        q = self.root / "quarantine"
        q.mkdir(exist_ok=True)
        try:
            os.replace(p, q / f"{p.name}.{os.getpid()}-{time.time_ns()}")
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise

    def _evict(self, keep: Optional[Path] = None) -> None:
        """Unlink least-recently-accessed entries until the total fits ``max_bytes``; sweep
        temporary files of dead writers. Serialized across processes by a lock file."""
        import fcntl

        with open(self.root / ".evict.lock", "a+b") as lk:
            fcntl.flock(lk.fileno(), fcntl.LOCK_EX)
            try:
                files, total = [], 0
                for f in self._entry_files():
                    try:
                        st = f.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    files.append((st.st_atime_ns, f.path, st.st_size))
                    total += st.st_size
                if total > self.max_bytes:
                    files.sort()
                    for _, path, size in files:
                        if total <= self.max_bytes:
                            break
                        if keep is not None and path == str(keep):
                            continue
                        try:
                            os.unlink(path)
                            self._n["evictions"] += 1
                        except FileNotFoundError:
                            pass
                        total -= size
                self._sweep_tmp()
            finally:
                fcntl.flock(lk.fileno(), fcntl.LOCK_UN)

    def _sweep_tmp(self) -> None:
        cutoff = time.time() - _TMP_MAX_AGE_S
        for d in os.scandir(self.root):
            if not d.is_dir(follow_symlinks=False) or d.name == "quarantine":
                continue
            try:
                for f in os.scandir(d.path):
                    if f.name.startswith(_TMP_PREFIX) and f.stat().st_mtime < cutoff:
                        os.unlink(f.path)
            except FileNotFoundError:
                continue
