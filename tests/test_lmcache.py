"""kvkernels as an LMCache serde plugin (kvkernels.integrations.lmcache), against LMCache 0.5.6.

LMCache pins numpy <= 2.2.6 and setuptools < 81, so these tests run in LMCache's own venv
(``bash scripts/lmcache_env.sh`` creates ``.venv-lmcache``; ``.ci/run`` runs this file there)
and skip, with the reason, in an interpreter where LMCache is not importable.

Until ``kvkernels.codec`` lands, a test-only stand-in of its contract (``_TestOnlyFakeCodec``,
below, never part of the package) is installed as ``kvkernels.codec`` when the real one is
missing; with the real codec present it is never used.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import types
import zlib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

try:
    import lmcache  # noqa: F401
    from lmcache.v1.distributed.serde import SerdeConfig, create_serde_processor
    _LMCACHE_ERR = None
    _LMCACHE_VERSION = importlib.metadata.version("lmcache")
except Exception as e:  # noqa: BLE001 -- any import failure means "not in LMCache's venv"
    _LMCACHE_ERR = f"{type(e).__name__}: {e}"
    _LMCACHE_VERSION = ""

pytestmark = pytest.mark.skipif(
    _LMCACHE_ERR is not None,
    reason=f"LMCache is not importable here ({_LMCACHE_ERR}); run in its venv: "
           "bash scripts/lmcache_env.sh && .venv-lmcache/bin/python -m pytest tests/test_lmcache.py")


# ---------------------------------------------------------------------------------------------
# Test-only stand-in for kvkernels.codec's contract (HELPERS.md), used only when it is missing.
# ---------------------------------------------------------------------------------------------
class _TestOnlyFakeCodec:
    """encode/decode/inspect/verify/CodecError with the contract's signatures. Container:
    b"FAKC" | u32 json_len | json header | payload | u32 crc32(all before). Presets 'default' and
    'cachegen': int8 per-(kind, layer, token) symmetric quantization (lossy, |err| <= amax/254)."""

    class CodecError(ValueError):
        pass

    class ContainerInfo(types.SimpleNamespace):
        pass

    DT = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

    @classmethod
    def encode(cls, kv, preset="default", *, chunk_tokens=256, coder="rans", model=""):
        if preset not in ("default", "cachegen"):
            raise ValueError(f"preset: unknown {preset!r}")
        if kv.dim() != 5 or kv.shape[0] != 2 or kv.dtype not in cls.DT.values():
            raise ValueError("kv: expected [2, L, T, H, D] bf16/fp16/fp32")
        _, L, T, H, D = kv.shape
        x = kv.detach().float().cpu().reshape(2, L, T, H * D)
        amax = x.abs().amax(-1, keepdim=True).clamp_min(1e-30)
        q = torch.round(x * (127.0 / amax)).clamp(-127, 127).to(torch.int8)
        payload = amax.squeeze(-1).contiguous().numpy().tobytes() + q.contiguous().numpy().tobytes()
        name = {v: k for k, v in cls.DT.items()}[kv.dtype]
        hdr = dict(version=1, model=model, preset=preset, coder=coder, L=L, T=T, H=H, D=D, dtype=name,
                   chunk_tokens=chunk_tokens, n_chunks=-(-T // chunk_tokens))
        width = len(json.dumps(hdr)) + 40          # room for "nbytes": N, padded with spaces
        hdr["nbytes"] = 8 + width + len(payload) + 4
        body = json.dumps(hdr).encode().ljust(width)
        head = b"FAKC" + struct.pack("<I", len(body)) + body + payload
        return head + struct.pack("<I", zlib.crc32(head))

    @classmethod
    def inspect(cls, data):
        data = bytes(data)
        if len(data) < 12 or data[:4] != b"FAKC":
            raise cls.CodecError("bad magic")
        (n,) = struct.unpack_from("<I", data, 4)
        if 8 + n > len(data):
            raise cls.CodecError("truncated header")
        try:
            h = json.loads(data[8:8 + n].decode())
        except Exception as e:  # noqa: BLE001
            raise cls.CodecError(f"bad header: {e}") from None
        if h["nbytes"] > len(data):
            raise cls.CodecError("truncated")
        return cls.ContainerInfo(**h)

    @classmethod
    def verify(cls, data):
        info = cls.inspect(data)
        data = bytes(data)[:info.nbytes]
        if struct.unpack_from("<I", data, len(data) - 4)[0] != zlib.crc32(data[:-4]):
            raise cls.CodecError("checksum mismatch")
        return info

    @classmethod
    def decode(cls, data, *, dtype=None, device="cpu", layers=None, chunks=None):
        info = cls.verify(data)
        data = bytes(data)
        (n,) = struct.unpack_from("<I", data, 4)
        L, T, H, D = info.L, info.T, info.H, info.D
        off = 8 + n
        amax = torch.frombuffer(bytearray(data[off:off + 2 * L * T * 4]), dtype=torch.float32).view(2, L, T, 1)
        off += 2 * L * T * 4
        q = torch.frombuffer(bytearray(data[off:off + 2 * L * T * H * D]), dtype=torch.int8).view(2, L, T, H * D)
        x = q.float() * (amax / 127.0)
        return x.view(2, L, T, H, D).to(dtype or cls.DT[info.dtype]).to(device)


def _install_codec():
    """The real kvkernels.codec if importable, else the test-only fake (returns the module)."""
    try:
        codec = importlib.import_module("kvkernels.codec")
        if all(hasattr(codec, n) for n in ("encode", "decode", "inspect", "verify", "CodecError")):
            return codec
    except ImportError:
        pass
    mod = types.ModuleType("kvkernels.codec")
    for n in ("encode", "decode", "inspect", "verify", "CodecError", "ContainerInfo"):
        setattr(mod, n, getattr(_TestOnlyFakeCodec, n))
    mod.__test_only_fake__ = True
    sys.modules["kvkernels.codec"] = mod
    import kvkernels
    kvkernels.codec = mod
    return mod


def _fake() -> bool:
    return bool(getattr(sys.modules.get("kvkernels.codec"), "__test_only_fake__", False))


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def codec():
    return _install_codec()


@pytest.fixture(scope="module")
def plugin(codec):
    import kvkernels.integrations.lmcache as p
    p.register()
    return p


def _obj(t: torch.Tensor):
    """An LMCache TensorMemoryObj over ``t`` (its own storage)."""
    from lmcache.v1.memory_management import MemoryObjMetadata, TensorMemoryObj
    t = t.contiguous()
    raw = t.reshape(-1).view(torch.uint8)
    return TensorMemoryObj(raw_data=raw, metadata=MemoryObjMetadata(
        shape=t.shape, dtype=t.dtype, address=-1, phy_size=raw.numel(), ref_count=1,
        shapes=[t.shape], dtypes=[t.dtype]), parent_allocator=None)


def _key(i: int, model: str = "kvk-test"):
    from lmcache.v1.distributed.api import ObjectKey
    return ObjectKey(chunk_hash=i.to_bytes(4, "big") * 8, model_name=model, kv_rank=0)


def _layout(shape, dtype):
    from lmcache.v1.distributed.api import MemoryLayoutDesc
    return MemoryLayoutDesc(shapes=[torch.Size(shape)], dtypes=[dtype])


def _kv(shape, dtype=torch.bfloat16):
    # KV-like: per-channel offsets and scales, a few outlier channels.
    x = torch.randn(shape) * (0.5 + torch.rand(shape[-1])) + torch.randn(shape[-1]) * 0.3
    x[..., :: max(1, shape[-1] // 7)] *= 6
    return x.to(dtype)


def _codec_roundtrip(codec, t4, preset="default", head_dim=None):
    _, L, T, HD = t4.shape
    d = head_dim or (128 if HD % 128 == 0 else 64 if HD % 64 == 0 else HD)
    data = codec.encode(t4.contiguous().view(2, L, T, HD // d, d), preset)
    return codec.decode(data, dtype=t4.dtype).reshape(t4.shape)


def _pair(plugin, **kw):
    s = plugin.KVKernelsSerializer(**{k: v for k, v in kw.items() if k not in ("verify",)})
    d = plugin.KVKernelsDeserializer(verify=kw.get("verify", True), model=kw.get("model", ""))
    return s, d


def _ser(s, t):
    est = s.estimate_serialized_size(_layout(t.shape, t.dtype))
    buf = torch.full((est,), 0xFF, dtype=torch.uint8)
    n = s.serialize(_obj(t), _obj(buf), _key(1))
    return buf, n, est


# ---------------------------------------------------------------------------------------------
# serde unit tests
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,dtype", [((2, 3, 256, 128), torch.bfloat16), ((2, 2, 77, 192), torch.float16),
                                         ((2, 1, 64, 64), torch.float32), ((2, 1, 5, 64), torch.float32)])
def test_serde_roundtrip_equals_codec_roundtrip(plugin, codec, shape, dtype):
    s, d = _pair(plugin)
    x = _kv(shape, dtype)
    buf, n, est = _ser(s, x)
    assert 0 < n <= est
    assert bool((buf[n:] == 0xFF).all()), "serializer wrote past the bytes it reported"
    _, L, T, HD = shape
    hd = 128 if HD % 128 == 0 else 64
    container = len(codec.encode(x.view(2, L, T, HD // hd, hd), "default"))
    fits = container <= x.numel() * x.element_size()      # else the lossless raw frame is written
    assert s.stats.counts == {"container": int(fits), "raw": int(not fits), "source_bytes": x.numel() * x.element_size(),
                              "written_bytes": n}
    assert n == 32 + (container if fits else x.numel() * x.element_size())
    out = torch.full(shape, float("nan"), dtype=dtype)
    d.deserialize(_obj(buf), _obj(out), _key(1))          # the whole estimated buffer, as LMCache does
    ref = _codec_roundtrip(codec, x) if fits else x
    assert torch.equal(out.view(torch.uint8) if dtype != torch.float32 else out, ref.view(torch.uint8)
                       if dtype != torch.float32 else ref), "the plugin must add nothing to the codec's error"
    # a sanity bound on the lossy preset (the codec's own tests own its exact bound)
    err = (out.float() - x.float()).norm() / x.float().norm()
    assert err < 0.25, err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the codec's GPU kernels)")
def test_serde_on_cuda_device(plugin, codec):
    """device="cuda": host buffers in and out, encode/decode on the GPU; frames are portable."""
    x = _kv((2, 4, 256, 128))
    s_gpu, d_gpu = _pair(plugin, device="cuda")
    s_cpu, d_cpu = _pair(plugin)
    buf, n, est = _ser(s_gpu, x)
    assert n <= est and s_gpu.stats.counts["container"] == 1
    data = bytes(buf[plugin.HEADER_BYTES:n].numpy())
    ref = codec.decode(data, dtype=x.dtype, device="cpu").reshape(x.shape)
    for d in (d_gpu, d_cpu):
        out = torch.full_like(x, float("nan"))
        d.deserialize(_obj(buf), _obj(out), _key(1))
        assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))
    buf2, n2, _ = _ser(s_cpu, x)                     # a CPU-written frame decodes on the GPU too
    out = torch.full_like(x, float("nan"))
    d_gpu.deserialize(_obj(buf2), _obj(out), _key(1))
    ref2 = codec.decode(bytes(buf2[plugin.HEADER_BYTES:n2].numpy()), dtype=x.dtype).reshape(x.shape)
    assert torch.equal(out.view(torch.uint8), ref2.view(torch.uint8))


def test_estimate_is_an_upper_bound_and_tight_for_raw(plugin):
    s, d = _pair(plugin)
    for shape, dtype in [((2, 4, 256, 128), torch.bfloat16), ((2, 1, 1, 64), torch.float16),
                         ((3, 7, 11), torch.float32), ((2, 2, 16, 96), torch.bfloat16)]:
        x = _kv(shape, dtype)
        buf, n, est = _ser(s, x)
        assert est == plugin.HEADER_BYTES + x.numel() * x.element_size()
        assert n <= est
    # a container that would not fit falls back to the raw (lossless) frame, still within the estimate
    big = _kv((2, 1, 4, 64))
    orig = s._encode
    s._encode = lambda t: (b"\0" * (t.numel() * t.element_size() + 1), "")
    try:
        buf, n, est = _ser(s, big)
    finally:
        s._encode = orig
    assert n == est
    out = torch.zeros_like(big)
    d.deserialize(_obj(buf), _obj(out), _key(1))
    assert torch.equal(out.view(torch.uint8), big.view(torch.uint8))


@pytest.mark.parametrize("shape,dtype,kw", [((3, 7, 11), torch.float32, {}),            # not [2, L, T, H*D]
                                            ((2, 2, 8, 96), torch.bfloat16, {"head_dim": 64}),  # H*D % head_dim
                                            ((2, 2, 8, 64), torch.float64, {}),          # dtype the codec lacks
                                            ((2, 2, 8, 64), torch.uint8, {})])
def test_raw_fallback_is_bit_exact(plugin, shape, dtype, kw):
    s, d = _pair(plugin, **kw)
    x = (torch.randint(0, 255, shape, dtype=torch.uint8) if dtype == torch.uint8 else _kv(shape, torch.float32).to(dtype))
    buf, n, est = _ser(s, x)
    assert n == est and s.stats.counts["raw"] == 1
    out = torch.zeros_like(x)
    d.deserialize(_obj(buf), _obj(out), _key(1))
    assert torch.equal(out.view(torch.uint8), x.view(torch.uint8))


def test_corrupted_or_mismatched_objects_are_refused(plugin, codec):
    s, d = _pair(plugin)
    x = _kv((2, 2, 64, 128))
    buf, n, est = _ser(s, x)
    poison = torch.full(x.shape, float("nan"), dtype=x.dtype)

    def refused(b, dst=None):
        dst = poison.clone() if dst is None else dst
        before = dst.clone()
        with pytest.raises(ValueError):
            d.deserialize(_obj(b), _obj(dst), _key(1))
        assert torch.equal(dst.view(torch.uint8), before.view(torch.uint8)), "refused object was written"

    for pos in (0, 9, 17, plugin.HEADER_BYTES + 3, n // 2, n - 1):   # magic, dtype, length, payload
        b = buf.clone()
        b[pos] ^= 0x41
        refused(b)
    refused(buf[: n // 2].clone())                                  # truncated
    refused(torch.zeros(est, dtype=torch.uint8))                    # empty / never written
    refused(buf, torch.zeros((2, 2, 32, 128), dtype=x.dtype))       # another layout
    refused(buf, torch.zeros((2, 2, 64, 128), dtype=torch.float16))  # another dtype
    # model check: a serde configured for another model refuses the container
    s2, _ = _pair(plugin, model="")
    d2 = plugin.KVKernelsDeserializer(model="other-model")
    x2 = _kv((2, 2, 256, 128))                                      # an LMCache chunk: coded, not raw
    b2, n2, est2 = _ser(s2, x2)
    assert n2 < est2, "the object was stored raw: the model check would not be exercised"
    poison = torch.full(x2.shape, float("nan"), dtype=x2.dtype)
    with pytest.raises(ValueError):
        d2.deserialize(_obj(b2), _obj(poison.clone()), _key(1))


def test_factory_options_and_registration(plugin):
    from lmcache.v1.distributed.serde import get_registered_serde_types
    plugin.register()   # idempotent
    assert "kvkernels" in get_registered_serde_types()
    proc = create_serde_processor(SerdeConfig(type="kvkernels", kwargs={"preset": "default", "head_dim": 64,
                                                                        "max_workers": 2}))
    try:
        assert proc.estimate_serialized_size(_layout((2, 2, 256, 128), torch.bfloat16)) == 32 + 2 * 2 * 256 * 128 * 2
    finally:
        proc.close()
    for bad in ({"presett": "default"}, {"max_workers": 0}, {"device": "tpu"}, {"verify": "yes"},
                {"chunk_tokens": 0}, {"head_dim": -1}):
        with pytest.raises(ValueError):
            create_serde_processor(SerdeConfig(type="kvkernels", kwargs=bad))


def test_frame_parser_bounds(plugin):
    from kvkernels.integrations.lmcache import frame
    with pytest.raises(frame.FrameError):
        frame.parse_header(b"\0" * 31)
    h = bytearray(frame.pack_header(frame.MODE_RAW, torch.float16, b"abcd", 4))
    assert frame.parse_header(bytes(h) + b"abcd").payload_bytes == 4
    with pytest.raises(frame.FrameError):
        frame.parse_header(bytes(h) + b"abc")                   # claims more than present
    h[10] = 1
    with pytest.raises(frame.FrameError):
        frame.parse_header(bytes(h) + b"abcd")                  # reserved field


# ---------------------------------------------------------------------------------------------
# through LMCache's StorageManager: mock L2 and filesystem L2 adapters
# ---------------------------------------------------------------------------------------------
def _storage_manager(adapter_cfgs):
    from lmcache.v1.distributed.config import (EvictionConfig, L1ManagerConfig, L1MemoryManagerConfig,
                                               StorageManagerConfig)
    from lmcache.v1.distributed.l2_adapters.config import L2AdaptersConfig
    from lmcache.v1.distributed.storage_manager import StorageManager
    return StorageManager(StorageManagerConfig(
        l1_manager_config=L1ManagerConfig(memory_config=L1MemoryManagerConfig(
            size_in_bytes=128 << 20, use_lazy=False, init_size_in_bytes=64 << 20)),
        eviction_config=EvictionConfig(eviction_policy="LRU"),
        l2_adapter_config=L2AdaptersConfig(adapters=adapter_cfgs)))


def _adapter_cfg(kind, path=None, serde=None):
    from lmcache.v1.distributed.l2_adapters.config import parse_args_to_l2_adapters_config
    import argparse
    spec = {"type": kind}
    if kind == "mock":
        spec.update(max_size_gb=0.5, mock_bandwidth_gb=100.0)
    else:
        spec["base_path"] = str(path)
    if serde:
        spec["serde"] = serde
    return parse_args_to_l2_adapters_config(argparse.Namespace(l2_adapter=[json.dumps(spec)])).adapters[0]


def _wait(pred, timeout=20.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.05)
    return False


def _put_clear_get(sm, keys, xs, layout, files_dir=None, n_files=None, corrupt=None):
    """Write xs to L1, wait for the L2 store, clear L1, prefetch back; (hit bits, tensors or None)."""
    from lmcache.v1.distributed.api import GroupedObjectKeys, PrefetchTaskSpec
    r = sm.reserve_write(keys, layout)
    for k, x in zip(keys, xs):
        r[k].tensor.view(x.shape).view(x.dtype).copy_(x)
    sm.finish_write(keys)

    def stored():   # in L2 (files / the mock's objects), and no serde temp buffer outstanding
        st = sm.report_status()
        n = (len([f for f in os.listdir(files_dir) if f.endswith(".data")]) if files_dir is not None
             else st["l2_adapters"][0]["stored_object_count"])
        return (n == (n_files or len(keys)) and st["store_controller"]["in_flight_task_count"] == 0
                and st["l1_manager"]["temporary_count"] == 0)
    assert _wait(stored, 180), sm.report_status()
    time.sleep(0.2)
    if corrupt is not None:
        corrupt()
    sm.clear(force=True)
    h = sm.submit_prefetch_task(PrefetchTaskSpec(key_groups=[GroupedObjectKeys(
        keys=keys, object_group_id=0, layout_desc=layout)], fetching_policy="full"))
    res = [None]
    assert _wait(lambda: (res.__setitem__(0, sm.query_prefetch_status(h)) or res[0] is not None), 180)
    bits = [res[0].hit_cells[0].test(i) if hasattr(res[0].hit_cells[0], "test") else None for i in range(len(keys))]
    hits = res[0].hit_cells[0].popcount()
    got = None
    if hits == len(keys):
        with sm.read_prefetched_results(keys) as objs:
            got = [o.tensor.view(xs[0].shape).view(xs[0].dtype).clone() for o in objs]
        sm.finish_read_prefetched(keys)
    return hits, bits, got


@pytest.mark.parametrize("kind", ["mock", "kvkernels_fs"])
def test_storage_manager_roundtrip(plugin, codec, tmp_path, kind):
    shape = (2, 3, 256, 128)
    layout = _layout(shape, torch.bfloat16)
    keys = [_key(i) for i in range(3)]
    xs = [_kv(shape) for _ in keys]
    sm = _storage_manager([_adapter_cfg(kind, tmp_path, {"type": "kvkernels", "preset": "default"})])
    try:
        hits, _, got = _put_clear_get(sm, keys, xs, layout, tmp_path if kind != "mock" else None, len(keys))
    finally:
        sm.close()
    assert hits == len(keys)
    for g, x in zip(got, xs):
        assert torch.equal(g.view(torch.uint8), _codec_roundtrip(codec, x).view(torch.uint8))
    if kind != "mock":
        sizes = [p.stat().st_size for p in tmp_path.glob("*.data")]
        raw = 32 + 2 * 3 * 256 * 128 * 2
        assert len(sizes) == 3 and all(s < raw for s in sizes), sizes   # containers, not padded buffers


@pytest.mark.parametrize("kind", ["mock", "kvkernels_fs"])
def test_storage_manager_raw_frames_bit_exact(plugin, tmp_path, kind):
    # A layout the codec cannot take (H*D not a multiple of head_dim) is stored raw: lossless.
    shape = (2, 2, 256, 96)
    layout = _layout(shape, torch.bfloat16)
    keys = [_key(10 + i) for i in range(2)]
    xs = [_kv(shape) for _ in keys]
    sm = _storage_manager([_adapter_cfg(kind, tmp_path, {"type": "kvkernels", "head_dim": 64})])
    try:
        hits, _, got = _put_clear_get(sm, keys, xs, layout, tmp_path if kind != "mock" else None, len(keys))
    finally:
        sm.close()
    assert hits == len(keys)
    for g, x in zip(got, xs):
        assert torch.equal(g.view(torch.uint8), x.view(torch.uint8))


def test_corrupted_file_is_a_miss_not_data(plugin, tmp_path):
    shape = (2, 2, 256, 128)
    layout = _layout(shape, torch.bfloat16)
    keys = [_key(20 + i) for i in range(3)]
    xs = [_kv(shape) for _ in keys]

    def corrupt():
        files = sorted(tmp_path.glob("*.data"))
        victim = next(f for f in files if keys[1].chunk_hash.hex() in f.name)
        b = bytearray(victim.read_bytes())
        b[len(b) // 2] ^= 0x10
        victim.write_bytes(bytes(b))
        other = next(f for f in files if keys[2].chunk_hash.hex() in f.name)
        other.write_bytes(other.read_bytes()[:100])                  # truncated

    sm = _storage_manager([_adapter_cfg("kvkernels_fs", tmp_path, {"type": "kvkernels"})])
    try:
        hits, _, got = _put_clear_get(sm, keys, xs, layout, tmp_path, len(keys), corrupt=corrupt)
    finally:
        sm.close()
    assert got is None, "a corrupted object must not be returned"
    assert hits < len(keys)


@pytest.mark.skipif(_LMCACHE_VERSION != "0.5.6", reason="documents LMCache 0.5.6's fs adapter only")
def test_lmcache_056_fs_adapter_drops_variable_size_payloads(plugin, tmp_path):
    """Why kvkernels_fs exists: 0.5.6's own "fs" adapter refuses a file shorter than the estimate."""
    shape = (2, 2, 256, 128)
    layout = _layout(shape, torch.bfloat16)
    keys = [_key(30)]
    sm = _storage_manager([_adapter_cfg("fs", tmp_path, {"type": "kvkernels"})])
    try:
        hits, _, _ = _put_clear_get(sm, keys, [_kv(shape)], layout, tmp_path, 1)
    finally:
        sm.close()
    assert hits == 0


# ---------------------------------------------------------------------------------------------
# a real server: the launcher, a client process, a restart, bytes on disk vs LMCache's serdes
# ---------------------------------------------------------------------------------------------
SHAPE_SPEC = "(2,64,16,2,64):bfloat16:4"      # per layer [2, NB=64, BS=16, H=2, D=64], 4 layers
N_REQUESTS = 3
N_TOKENS = 511                                # + the sequence token = 512 = 2 chunks of 256


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env():
    # keep the parent's PYTHONPATH (on the GPU machine LMCache lives in a --target dir on it)
    path = [str(ROOT), str(TESTS)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, LMCACHE_DISABLE_BANNER="1", PYTHONPATH=os.pathsep.join(path))
    return env


class _Server:
    def __init__(self, l2_spec: dict, log: Path, launcher: bool = True):
        self.port, self.http = _free_port(), _free_port()
        args = ["--host", "127.0.0.1", "--port", str(self.port), "--http-host", "127.0.0.1",
                "--http-port", str(self.http), "--chunk-size", "256", "--l1-size-gb", "0.25",
                "--eviction-policy", "LRU", "--no-l1-use-lazy", "--disable-observability",
                "--l2-adapter", json.dumps(l2_spec)]
        if launcher and not _fake():
            cmd = [sys.executable, "-m", "kvkernels.integrations.lmcache.launch", *args]
        elif launcher:   # the fake codec must be installed in the server process first
            cmd = [sys.executable, "-c", "import sys, test_lmcache as t; t._install_codec(); "
                   "from kvkernels.integrations.lmcache.launch import main; main(sys.argv[1:])", *args]
        else:
            cmd = [sys.executable, "-c", "import sys; from lmcache.cli.main import main; main(['server', *sys.argv[1:]])", *args]
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(cmd, env=_child_env(), stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 90:
            if self.proc.poll() is not None:
                tail = Path(log).read_bytes()[-3000:].decode("utf-8", "replace")
                raise RuntimeError(f"server exited {self.proc.returncode}; {log} ends:\n{tail}")
            if b"LMCache cache server is running..." in Path(log).read_bytes():
                return
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server did not start in 90 s; see {log}")

    @property
    def url(self):
        return f"tcp://127.0.0.1:{self.port}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


def _client(server: _Server, phase: str, data: Path, log: Path):
    r = subprocess.run([sys.executable, "-c", "import sys, test_lmcache as t; t._client_main(*sys.argv[1:])",
                        server.url, f"http://127.0.0.1:{server.http}", phase, str(data)],
                       env=_child_env(), capture_output=True, timeout=240)
    log.write_bytes(r.stdout + r.stderr)
    assert r.returncode == 0, (r.stdout + r.stderr).decode(errors="replace")[-4000:]
    return json.loads(r.stdout.decode().strip().splitlines()[-1])


def _client_main(rpc_url, http_url, phase, data_path):
    """Client process: STORE (fill every request's paged KV with random data, save it) or RETRIEVE
    (into zeroed paged KV, save what came back). Uses LMCache's own mock-Worker client."""
    from lmcache.cli.commands.bench.server_bench.client import ServerBenchClient
    from lmcache.cli.commands.bench.server_bench.config import BenchConfig
    cfg = BenchConfig(rpc_url=rpc_url, http_url=http_url, mode="cpu", transfer_mode="lmcache_driven", tp_size=1,
                      use_mla=False, num_tokens=N_TOKENS, kvcache_shape_spec=SHAPE_SPEC, num_blocks=64,
                      block_size=16)
    c = ServerBenchClient(cfg, log=lambda m: print(m, file=sys.stderr))
    c.start()
    out = {"ok": []}
    saved = torch.load(data_path) if phase == "retrieve" else {}
    try:
        w = c._workers[0]
        names = sorted(w.kv_caches, key=lambda n: int(n.split(".")[1]))
        for seq in range(N_REQUESTS):
            req = c.create_request(seq, f"req-{phase}-{seq}", phase)
            blocks = list(range(req.block_offset, req.block_offset + req.num_blocks))
            if phase == "store":
                g = torch.Generator().manual_seed(1000 + seq)
                for n in names:
                    t = w.kv_caches[n]
                    vals = torch.randn(t[:, blocks].shape, generator=g) * (1 + torch.rand(t.shape[-1], generator=g))
                    t[:, blocks] = vals.to(t.dtype)
                saved[seq] = torch.stack([w.kv_caches[n][:, blocks].clone() for n in names], 1)
                res = c.store(req, 0, req.num_full_tokens)
            else:
                for n in names:
                    w.kv_caches[n][:, blocks] = 0
                # LOOKUP as ServerBenchClient.lookup does, with a polling budget for a slow CPU codec
                # (its own is 50 x 50 ms); the prefetch loads the chunks from the L2 tier.
                from lmcache.cli.commands.bench.server_bench import helpers as hp
                key = hp._make_key(req.token_ids, req.request_id, start=0, end=req.num_full_tokens,
                                   world_size=c._kv_world_size)
                assert hp._send_lookup(c._req_client, key, tp_size=1), "LOOKUP timed out"
                hits = hp._poll_prefetch_status(c._req_client, key.request_id, max_polls=2400, poll_interval=0.05)
                res = c.retrieve(req, 0, req.num_full_tokens)
                saved[("got", seq)] = torch.stack([w.kv_caches[n][:, blocks].clone() for n in names], 1)
                saved[("hit", seq)] = hits
            out["ok"].append(bool(res.succeeded))
            c.end_session(req)
        if phase == "store":
            time.sleep(1.0)   # let the server's store controller flush to L2
    finally:
        c.close()
    torch.save(saved, data_path)
    print(json.dumps(out))


def _dir_bytes(p: Path):
    files = list(p.glob("*.data"))
    return len(files), sum(f.stat().st_size for f in files)


def test_real_server_restart_and_bytes_on_disk(plugin, codec, tmp_path):
    l2 = tmp_path / "kvk"
    l2.mkdir()
    spec = {"type": "kvkernels_fs", "base_path": str(l2),
            "serde": {"type": "kvkernels", "preset": "default", "head_dim": 64}}
    data = tmp_path / "kv.pt"
    srv = _Server(spec, tmp_path / "server1.log")
    try:
        r = _client(srv, "store", data, tmp_path / "client_store.log")
        assert all(r["ok"]), r
        assert _wait(lambda: _dir_bytes(l2)[0] == 2 * N_REQUESTS, 180), _dir_bytes(l2)
    finally:
        srv.stop()
    n_files, kvk_bytes = _dir_bytes(l2)
    srv = _Server(spec, tmp_path / "server2.log")      # restarted: L1 is empty, the L2 files remain
    try:
        r = _client(srv, "retrieve", data, tmp_path / "client_retrieve.log")
    finally:
        srv.stop()
    assert all(r["ok"]), r
    saved = torch.load(data)
    for seq in range(N_REQUESTS):
        assert saved[("hit", seq)] == 2, f"request {seq}: {saved[('hit', seq)]} of 2 chunks hit after restart"
        x, got = saved[seq], saved[("got", seq)]                 # [2, L, NB, BS, H, D]
        # the server's object per chunk: [2, L, 256, H*D]; the plugin adds nothing to the codec's error
        for ch in range(2):
            xc = x[:, :, ch * 16:(ch + 1) * 16].reshape(2, 4, 256, 128)
            gc = got[:, :, ch * 16:(ch + 1) * 16].reshape(2, 4, 256, 128)
            assert torch.equal(gc.view(torch.uint8), _codec_roundtrip(codec, xc, head_dim=64).view(torch.uint8))

    # the same KV through LMCache's own serdes (plain "fs"; fixed-size payloads load there)
    sizes = {"kvkernels": kvk_bytes, "raw_bf16": n_files * 2 * 4 * 256 * 128 * 2}
    builtin = [("fp8", {"type": "fp8"})]
    if torch.cuda.is_available():   # LMCache 0.5.6's turboquant serde runs only on CUDA
        builtin.append(("turboquant", {"type": "turboquant", "head_dim": 64, "skip_first_layers": 0,
                                       "skip_last_layers": 0}))
    for name, serde in builtin:
        d = tmp_path / name
        d.mkdir()
        try:
            srv = _Server({"type": "fs", "base_path": str(d), "serde": serde}, tmp_path / f"server_{name}.log",
                          launcher=False)
        except RuntimeError:
            if name == "fp8":
                raise
            continue
        try:
            shutil.copy(data, tmp_path / f"{name}.pt")
            r = _client(srv, "store", tmp_path / f"{name}.pt", tmp_path / f"client_{name}.log")
            _wait(lambda: _dir_bytes(d)[0] == 2 * N_REQUESTS, 180)
        finally:
            srv.stop()
        if _dir_bytes(d)[0] == 2 * N_REQUESTS:
            sizes[name] = _dir_bytes(d)[1]
    print("bytes on disk for", n_files, "chunks:", json.dumps(sizes))
    (tmp_path / "sizes.json").write_text(json.dumps(sizes))
    if os.environ.get("KVK_LMCACHE_SIZES"):
        Path(os.environ["KVK_LMCACHE_SIZES"]).write_text(json.dumps(sizes))
    assert sizes["fp8"] == sizes["raw_bf16"] // 2
    assert kvk_bytes < sizes["raw_bf16"]
    if not _fake():
        assert kvk_bytes < sizes["fp8"], sizes
