"""KV plumbing of the run: HF caches <-> flat KV ``[2, L, T, H, D]``, RoPE shifts, compression.

Compression goes through :class:`Compressor`: :class:`CodecCompressor` (``kvkernels.codec``,
the default and only default path) or, when asked for with ``--compression standin``,
:class:`StandinQuantCompressor` -- ``kvkernels.quantize`` codes (no entropy coding) in a small
container of its own, a comparison option whose rows are labelled "stand-in".
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
from typing import Optional

import torch


# -- HF cache <-> flat KV ------------------------------------------------------------------------
def cache_to_flat(cache, start: int = 0) -> torch.Tensor:
    """Flat KV ``[2, L, T - start, H, D]`` (K then V) of an HF cache of batch 1, tokens from ``start``."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        ks, vs = [l.keys for l in layers], [l.values for l in layers]
    else:  # older transformers
        ks, vs = cache.key_cache, cache.value_cache
    k = torch.stack([x[0, :, start:].transpose(0, 1) for x in ks])  # [L, T, H, D]
    v = torch.stack([x[0, :, start:].transpose(0, 1) for x in vs])
    return torch.stack([k, v])


def flat_to_cache(kv: torch.Tensor, config):
    """An HF ``DynamicCache`` holding flat KV ``[2, L, T, H, D]`` as batch 1."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for layer in range(kv.shape[1]):
        cache.update(kv[0, layer].transpose(0, 1).unsqueeze(0), kv[1, layer].transpose(0, 1).unsqueeze(0), layer)
    return cache


def rope_inv_freq(model) -> torch.Tensor:
    return model.model.rotary_emb.inv_freq.float()


def shift_keys(k: torch.Tensor, delta: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys ``[L, T, H, D]`` rotated by RoPE at positions p -> the same keys at p + ``delta``
    (HF Llama's rotate-half convention: rotations compose, R(delta) R(p) = R(p + delta))."""
    if delta == 0:
        return k
    ang = delta * inv_freq.to(k.device, torch.float64)
    ang = torch.cat([ang, ang])
    cos, sin = ang.cos().float(), ang.sin().float()
    kf = k.float()
    half = kf.shape[-1] // 2
    rot = torch.cat([-kf[..., half:], kf[..., :half]], dim=-1)
    return (kf * cos + rot * sin).to(k.dtype)


# -- compression -----------------------------------------------------------------------------------
class Compressor:
    """``encode(kv [2, L, T, H, D]) -> bytes``, ``decode(bytes, device, dtype) -> kv``,
    ``verify(bytes)`` (raise on a malformed container: the store's ``check``)."""

    name = "?"
    label = "?"

    def encode(self, kv: torch.Tensor) -> bytes:
        raise NotImplementedError

    def decode(self, data: bytes, device="cpu", dtype=None) -> torch.Tensor:
        raise NotImplementedError

    def verify(self, data: bytes):
        raise NotImplementedError


def codec_available() -> bool:
    try:
        return importlib.util.find_spec("kvkernels.codec") is not None
    except Exception:
        return False


class CodecCompressor(Compressor):
    """The codec: ``kvkernels.codec.encode / decode / verify`` (docs/codec-spec.md)."""

    def __init__(self, preset: str = "default", model: str = ""):
        from kvkernels import codec

        self.codec, self.preset, self.model = codec, preset, model
        self.name = f"codec:{preset}"
        self.label = f"codec, preset {preset}"

    def encode(self, kv):
        return self.codec.encode(kv, self.preset, model=self.model)

    def decode(self, data, device="cpu", dtype=None):
        return self.codec.decode(data, dtype=dtype, device=device)

    def verify(self, data):
        return self.codec.verify(data)


STANDIN_PRESETS = {  # name -> (key format, value format)
    "default": ("int8:g64:channel", "int8:g64:channel"),
    "int8": ("int8:g64:channel", "int8:g64:channel"),
    "int4-kivi": ("int4:g32:token", "int4:g32:channel"),
    "fp8": ("fp8:token_head", "fp8:token_head"),
}
_SMAGIC = b"KVKQSTD1"


class StandinQuantCompressor(Compressor):
    """Comparison option (``--compression standin``), not the codec: K and V through
    ``kvkernels.quantize`` (no entropy coding), in a container of its own:
    ``MAGIC | u32 header length | JSON header | tensors' bytes | sha256 of all before``."""

    def __init__(self, preset: str = "default"):
        if preset not in STANDIN_PRESETS:
            raise ValueError(f"preset: the stand-in compression knows {sorted(STANDIN_PRESETS)}, got {preset!r}")
        self.kf, self.vf = STANDIN_PRESETS[preset]
        self.name = f"standin:{preset}"
        self.label = f"stand-in: kvkernels.quantize K {self.kf} / V {self.vf}, not the codec"

    def encode(self, kv):
        import kvkernels

        parts, meta = [], []
        for kind, fmt in (("k", self.kf), ("v", self.vf)):
            q = kvkernels.quantize(kv[0 if kind == "k" else 1].contiguous(), fmt)
            for name in ("codes", "scale", "zero"):
                t = getattr(q, name)
                if t is None:
                    continue
                t = t.detach().cpu().contiguous()
                raw = t.view(torch.uint8).reshape(-1).numpy().tobytes() if t.numel() else b""
                meta.append({"kind": kind, "name": name, "dtype": str(t.dtype).replace("torch.", ""),
                             "shape": list(t.shape), "nbytes": len(raw)})
                parts.append(raw)
        head = json.dumps({"k": self.kf, "v": self.vf, "shape": list(kv.shape), "dtype": str(kv.dtype).replace(
            "torch.", ""), "tensors": meta}).encode()
        body = _SMAGIC + struct.pack("<I", len(head)) + head + b"".join(parts)
        return body + hashlib.sha256(body).digest()

    def _parse(self, data: bytes):
        if len(data) < 12 + 32 or data[:8] != _SMAGIC:
            raise ValueError("not a stand-in container (bad magic or too short)")
        if hashlib.sha256(data[:-32]).digest() != data[-32:]:
            raise ValueError("stand-in container checksum mismatch")
        (hl,) = struct.unpack_from("<I", data, 8)
        if 12 + hl > len(data) - 32:
            raise ValueError("stand-in container header length out of range")
        head = json.loads(data[12:12 + hl])
        if sum(t["nbytes"] for t in head["tensors"]) != len(data) - 32 - 12 - hl:
            raise ValueError("stand-in container tensor sizes do not add up")
        return head, 12 + hl

    def verify(self, data):
        return self._parse(bytes(data))[0]

    def decode(self, data, device="cpu", dtype=None):
        import kvkernels
        from kvkernels.formats import QuantFormat, QuantizedKV

        head, pos = self._parse(bytes(data))
        got = {}
        for t in head["tensors"]:
            raw = bytearray(data[pos:pos + t["nbytes"]])
            pos += t["nbytes"]
            dt = getattr(torch, t["dtype"])
            x = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
            got[(t["kind"], t["name"])] = x.view(dt).reshape(t["shape"]).to(device)
        out_dtype = dtype or getattr(torch, head["dtype"])
        kv = torch.empty(head["shape"], dtype=out_dtype, device=device)
        for i, kind in enumerate("kv"):
            q = QuantizedKV(got[(kind, "codes")], got[(kind, "scale")], got.get((kind, "zero")),
                            QuantFormat.parse(head[kind]), out_dtype, head["shape"][-1])
            kv[i] = kvkernels.dequantize(q, out_dtype)
        return kv


def make_compressor(kind: str = "codec", preset: str = "default", model: str = "") -> Compressor:
    """``kind``: "codec" (``kvkernels.codec``; "auto" is accepted as a synonym) or "standin"
    (``kvkernels.quantize`` codes without entropy coding, labelled as such: a comparison option).
    ``model``: the codec's table-bank name (``"SmolLM2-135M-Instruct"`` for the bundled bank)."""
    if kind in ("codec", "auto"):
        return CodecCompressor(preset, model)
    if kind == "standin":
        return StandinQuantCompressor(preset)
    raise ValueError(f"compression must be 'codec' or 'standin', got {kind!r}")
