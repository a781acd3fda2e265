"""Probability tables of the codec: normalization and shared (profiled) table banks.

``normalize(counts, bins, prob_bits)`` turns histograms into frequency rows that sum to
``2**prob_bits`` with every one of the first ``bins`` symbols > 0 (docs/codec-spec.md, 2.4).

A *bank* holds profiled histograms ``counts`` uint32 ``[2, L, Cb, bins_max]`` (kind, layer,
channel or 1 channel shared by all, symbol) for one model; its file format is in
docs/codec-spec.md and its identity is the blake2b-256 hash of the file. Containers refer to
a bank by that hash; :func:`lookup` finds a registered bank (the bundled ones are registered
on import).
"""
from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch

DATA = Path(__file__).resolve().parent.parent / "data"
BANK_MAGIC = b"KVKT"
BANK_VERSION = 2  # written; 1 (raw counts) is still read
MAX_BANK_BYTES = 64 << 20


class TableError(ValueError):
    """A malformed table bank or table (the container raises it as a CodecError)."""


def normalize(counts: torch.Tensor, bins, prob_bits: int) -> torch.Tensor:
    """int32 ``[K, W]`` frequency rows from non-negative counts ``[K, W]``.

    ``bins``: int or int tensor ``[K]``: row k uses its first ``bins[k]`` symbols; entries past
    it are 0. ``f = floor(count * (2^p - bins) / total) + 1`` then the remainder goes to the most
    frequent symbol (the first on ties). Deterministic integer arithmetic (int64), on the
    counts' device (the same rows on any device).
    """
    counts = counts.to(torch.int64)
    dev = counts.device
    K, W = counts.shape
    b = (torch.as_tensor(bins, dtype=torch.int64, device=dev).expand(K) if not isinstance(bins, torch.Tensor)
         else bins.to(device=dev, dtype=torch.int64))
    col = torch.arange(W, dtype=torch.int64, device=dev).unsqueeze(0)
    live = col < b.unsqueeze(1)
    counts = torch.where(live, counts, torch.zeros_like(counts))
    total = counts.sum(1, keepdim=True)
    budget = (1 << prob_bits) - b.unsqueeze(1)
    f = torch.where(total > 0, counts * budget // total.clamp_min(1), torch.zeros_like(counts)) + 1
    f = torch.where(live, f, torch.zeros_like(f))
    rem = (1 << prob_bits) - f.sum(1)
    top = torch.where(live, counts, torch.full_like(counts, -1)).argmax(1)  # first max
    f[torch.arange(K, device=dev), top] += rem
    return f.to(torch.int32)


def cdf_from_freq(freq: torch.Tensor) -> torch.Tensor:
    """int32 ``[K, W + 1]`` CDF rows ``[0, cumsum(freq)]`` (16-bit freq: last = 65536)."""
    z = torch.zeros(freq.shape[0], 1, dtype=torch.int64, device=freq.device)
    return torch.cat([z, freq.to(torch.int64).cumsum(1)], 1).to(torch.int32)


def check_freq(freq: torch.Tensor, bins: torch.Tensor, prob_bits: int) -> Optional[str]:
    """Why ``freq`` ``[K, W]`` is not valid for ``bins [K]`` (None when valid)."""
    W = freq.shape[1]
    col = torch.arange(W).unsqueeze(0)
    live = col < bins.unsqueeze(1).to(torch.int64)
    f = freq.to(torch.int64)
    if bool(((f <= 0) & live).any()):
        return "a table has a zero frequency"
    if bool(((f != 0) & ~live).any()):
        return "a table has a frequency past its bins"
    if bool((f.sum(1) != (1 << prob_bits)).any()):
        return f"a table does not sum to 2^{prob_bits}"
    return None


@dataclass(frozen=True)
class Bank:
    """Profiled histograms of one model: ``counts`` int64 ``[2, L, Cb, bins_max]``."""

    model: str
    counts: torch.Tensor
    data: bytes  # the file's bytes
    hash: bytes  # blake2b-256 of ``data``

    @property
    def L(self) -> int:
        return self.counts.shape[1]

    @property
    def channels(self) -> int:
        return self.counts.shape[2]

    @property
    def bins_max(self) -> int:
        return self.counts.shape[3]


def bank_hash(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()


def bank_to_bytes(model: str, counts: torch.Tensor, version: int = BANK_VERSION) -> bytes:
    """File bytes of a bank of ``counts`` ``[2, L, Cb, bins_max]`` (values < 2^32).

    Version 1 stores the counts raw (uint32 LE); version 2 (the default) stores them zlib-
    compressed (level 9; per-channel banks are mostly zeros), same header, CRC32 of the file.
    """
    if version not in (1, 2):
        raise ValueError(f"version: expected 1 or 2, got {version!r}")
    counts = counts.to(torch.int64)
    if counts.dim() != 4 or counts.shape[0] != 2:
        raise ValueError(f"counts: expected [2, L, Cb, bins_max], got {tuple(counts.shape)}")
    if bool((counts < 0).any()) or bool((counts >= 1 << 32).any()):
        raise ValueError("counts: expected values in [0, 2^32)")
    m = model.encode("utf-8")
    _, L, Cb, W = counts.shape
    head = BANK_MAGIC + struct.pack("<HHH", version, 0, len(m)) + m + struct.pack("<IIHH", L, Cb, W, 0)
    raw = counts.numpy().astype("<u4").tobytes()
    body = head + (raw if version == 1 else zlib.compress(raw, 9))
    return body + struct.pack("<I", zlib.crc32(body))


def bank_from_bytes(data: bytes) -> Bank:
    """Parse a bank file (untrusted: bounded, checksummed)."""
    if len(data) > MAX_BANK_BYTES or len(data) < 10:
        raise TableError("table bank: bad size")
    if data[:4] != BANK_MAGIC:
        raise TableError("table bank: bad magic")
    ver, _, ml = struct.unpack_from("<HHH", data, 4)
    if ver not in (1, 2):
        raise TableError(f"table bank: unknown version {ver}")
    p = 10 + ml
    if p + 12 + 4 > len(data):
        raise TableError("table bank: truncated")
    model = data[10:p].decode("utf-8", "replace")
    L, Cb, W, _ = struct.unpack_from("<IIHH", data, p)
    p += 12
    if not (1 <= L <= 4096 and 1 <= Cb <= 65536 and 2 <= W <= 256):
        raise TableError("table bank: dimensions out of range")
    n = 2 * L * Cb * W
    if 4 * n > MAX_BANK_BYTES or (ver == 1 and p + 4 * n + 4 != len(data)):
        raise TableError("table bank: size does not match its dimensions")
    if zlib.crc32(data[:-4]) != struct.unpack_from("<I", data, len(data) - 4)[0]:
        raise TableError("table bank: checksum mismatch")
    import numpy as np

    if ver == 2:
        d = zlib.decompressobj()
        try:
            raw = d.decompress(bytes(data[p:-4]), 4 * n)  # bounded: never more than the dimensions say
        except zlib.error as e:
            raise TableError(f"table bank: bad compressed counts ({e})") from None
        if len(raw) != 4 * n or d.unconsumed_tail or not d.eof or d.unused_data:
            raise TableError("table bank: compressed counts do not match its dimensions")
        p, data_c = 0, raw
    else:
        data_c = data
    counts = torch.from_numpy(np.frombuffer(data_c, dtype="<u4", count=n, offset=p).astype(np.int64))
    return Bank(model, counts.reshape(2, L, Cb, W), bytes(data), bank_hash(data))


_REGISTRY: Dict[bytes, Bank] = {}
_BUNDLED_LOADED = False


def register_bank(bank_or_bytes) -> Bank:
    """Register a bank (a :class:`Bank` or file bytes) so containers referring to it decode."""
    bank = bank_or_bytes if isinstance(bank_or_bytes, Bank) else bank_from_bytes(bytes(bank_or_bytes))
    _REGISTRY.pop(bank.hash, None)  # re-registering makes it the most recent
    _REGISTRY[bank.hash] = bank
    return bank


def _load_bundled() -> None:
    global _BUNDLED_LOADED
    if _BUNDLED_LOADED:
        return
    _BUNDLED_LOADED = True
    for p in sorted(DATA.glob("*.kvtables")):
        register_bank(p.read_bytes())


def lookup(h: bytes) -> Optional[Bank]:
    """The registered bank of hash ``h`` (None if unknown)."""
    _load_bundled()
    return _REGISTRY.get(bytes(h))


def bank_for(model: str, L: int, C: int) -> Optional[Bank]:
    """The registered bank for ``model`` matching ``L`` layers and ``C`` channels (or None);
    the most recently registered one when several match."""
    _load_bundled()
    for b in reversed(list(_REGISTRY.values())):
        if b.model == model and b.L == L and b.channels in (1, C):
            return b
    return None
