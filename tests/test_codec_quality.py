"""Codec presets of the quality study: channel_delta, exact (sink) tokens, bank v2, and a coarse
quality invariant on SmolLM2-135M (short text, CPU)."""
import struct
import zlib

import pytest
import torch

from kvkernels import codec
from kvkernels.codec import container as ct
from kvkernels.codec import presets as P
from kvkernels.codec import tables as TB

MODEL = "SmolLM2-135M-Instruct"


def _kv(L=3, T=77, H=2, D=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(2, L, T, H, D, generator=g)
    kv[0, :, :, :, 3] *= 8 + 20  # an outlier key channel with a large offset
    kv[0, :, :, :, 5] += 40
    kv[:, :, 0] *= 30  # a sink-like first token
    kv[:, :, T // 2, 0, 1] = 500.0  # one huge outlier element
    return kv.to(dtype)


def _delta_preset(L, exact=1, bins=32, step=0.4, ch_step=None):
    k = P.KindSpec("channel_delta", (bins,) * L, (step,) * L, exact, ch_step)
    v = P.KindSpec("channel_delta", (max(4, bins // 2),) * L, (step,) * L, exact, ch_step)
    return P.Preset("default", k, v, "chunk")


def _expected(kv, pr, chunk, dtype=None):
    _, L, T, H, D = kv.shape
    x = kv.float().reshape(2, L, T, H * D)
    y = torch.stack([torch.stack([P.fake_quant_layer(x[k, l], pr.kind(k), l, chunk) for l in range(L)])
                     for k in range(2)])
    return y.reshape(kv.shape).to(dtype or kv.dtype)


@pytest.mark.parametrize("coder", ["rans", "ac"])
@pytest.mark.parametrize("shape,chunk,exact", [((3, 77, 2, 16), 32, 1), ((1, 1, 1, 8), 256, 1),
                                               ((2, 40, 1, 24), 2, 5), ((2, 9, 2, 8), 4, 0)])
def test_channel_delta_round_trip(coder, shape, chunk, exact):
    L, T, H, D = shape
    kv = _kv(L, T, H, D, seed=T)
    pr = _delta_preset(L, exact)
    data = codec.encode(kv, pr, chunk_tokens=chunk, coder=coder)
    y = codec.decode(data)
    assert torch.equal(y, _expected(kv, pr, chunk))
    e = min(exact, T)
    assert torch.equal(y[:, :, :e], kv[:, :, :e])  # exact tokens are bit-exact
    info = codec.verify(data)
    assert info.preset_config["k"].get("exact", 0) == exact
    # partial decode: chunks past the exact tokens and a middle layer range
    nc = info.n_chunks
    if nc > 1:
        part = codec.decode(data, chunks=range(1, nc), layers=range(L - 1, L))
        assert torch.equal(part, y[:, L - 1:, chunk:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_exact_tokens_dtypes(dtype):
    kv = _kv(2, 50, 2, 8, dtype=dtype)
    pr = _delta_preset(2, exact=3)
    y = codec.decode(codec.encode(kv, pr, chunk_tokens=16))
    assert y.dtype == dtype
    assert torch.equal(y[:, :, :3], kv[:, :, :3])
    assert torch.equal(y, _expected(kv, pr, 16))


def test_channel_delta_never_clamps():
    """|error| <= delta / 2 everywhere (outliers included): the step grows to cover the range."""
    kv = _kv(2, 64, 2, 16, seed=4)
    L, C = 2, 32
    base = tuple(torch.full((C,), 0.05) for _ in range(L))  # fine profiled steps: the range decides
    pr = _delta_preset(L, exact=1, bins=16, ch_step=base)
    y = codec.decode(codec.encode(kv, pr, chunk_tokens=32))
    x = kv.reshape(2, L, 64, C)
    yy = y.reshape(2, L, 64, C)
    for k in range(2):
        for l in range(L):
            for t0 in (0, 32):
                seg = P.neutralize(x[k, l, t0:t0 + 32], 1 - t0)
                sym, side = P.quantize(seg.unsqueeze(0), pr.kind(k), l)
                d = side["delta"].float()[0]
                assert bool((d >= 0.05 * (1 - 2 ** -10)).all())
                err = (yy[k, l, t0:t0 + 32] - x[k, l, t0:t0 + 32]).abs()
                lo = 1 if t0 == 0 else 0
                bound = 0.5 * d + 2e-3 * (x[k, l, t0:t0 + 32].abs() + d)
                assert bool((err[lo:] <= bound[lo:]).all())


def test_neutralize_keeps_statistics():
    g = torch.Generator().manual_seed(1)
    seg = torch.randn(10, 4, generator=g)
    seg[0] = 1000
    n = P.neutralize(seg, 1)
    assert torch.equal(n[1:], seg[1:]) and torch.allclose(n[0], seg[1:].mean(0))
    assert P.neutralize(seg, 0) is seg
    assert torch.equal(P.neutralize(seg, 20), torch.zeros_like(seg))


def test_config_validation():
    L = 2
    good = _delta_preset(L, exact=2).to_config()
    assert P.Preset.from_config(good, L).k.exact == 2
    for bad in (0, -1, 257, 1.5, "1", True):
        c = _delta_preset(L).to_config()
        c["k"]["exact"] = bad
        with pytest.raises(P.PresetError):
            P.Preset.from_config(c, L)
    c = _delta_preset(L).to_config()
    c["v"]["bins"] = [2, 2]
    with pytest.raises(P.PresetError):
        P.Preset.from_config(c, L)
    # the CacheGen baseline's config is unchanged (no exact key, token_sym)
    assert P.cachegen(3).to_json() == (b'{"k":{"bins":[32,32,32],"mode":"token_sym"},"name":"cachegen","tables":"chunk",'
                                       b'"v":{"bins":[32,32,16],"mode":"token_sym"}}')


def test_forged_exact_tokens_rejected():
    kv = _kv(1, 20, 1, 8)
    pr = _delta_preset(1, exact=1)
    data = bytearray(codec.encode(kv, pr, chunk_tokens=8))
    # locate chunk 0, layer 0 record: its K part ends with the exact token (8 float32)
    h = ct._parse_header(memoryview(bytes(data)))
    d = ct._layer_dir(memoryview(bytes(data)), h, 0)
    raw = struct.pack("<8f", *kv[0, 0, 0, 0].tolist())
    start, end = d[0], d[1]
    pos = bytes(data).find(raw, start, end)
    assert pos > 0
    nan = struct.pack("<f", float("nan"))
    data[pos:pos + 4] = nan
    # fix the record CRC so only the value check can catch it
    rec_seed = ct._record_seed(0, 0, 8, 8)
    data[end - 4:end] = struct.pack("<I", zlib.crc32(bytes(data[start:end - 4]), rec_seed))
    body = bytes(data[:-4])
    data[-4:] = struct.pack("<I", zlib.crc32(body))
    with pytest.raises(codec.CodecError, match="exact"):
        codec.decode(bytes(data))
    with pytest.raises(codec.CodecError):
        codec.decode(bytes(data[:-40]))


def test_bank_v2_round_trip_and_untrusted():
    g = torch.Generator().manual_seed(3)
    counts = torch.randint(0, 50, (2, 3, 8, 16), generator=g)
    counts[..., 10:] = 0
    for ver in (1, 2):
        data = TB.bank_to_bytes("unit-v", counts, version=ver)
        b = TB.bank_from_bytes(data)
        assert torch.equal(b.counts, counts) and b.model == "unit-v"
    v1, v2 = TB.bank_to_bytes("unit-v", counts, 1), TB.bank_to_bytes("unit-v", counts, 2)
    assert len(v2) < len(v1)

    def recrc(b):
        return b[:-4] + struct.pack("<I", zlib.crc32(b[:-4]))

    p = 10 + len("unit-v")
    # garbage compressed body, a body decompressing to too little, and a zip bomb's dimensions
    with pytest.raises(TB.TableError):
        TB.bank_from_bytes(recrc(v2[:p + 12] + b"\x00" * 20 + b"\0\0\0\0"))
    short = v2[:p + 12] + zlib.compress(b"\0" * 100) + b"\0\0\0\0"
    with pytest.raises(TB.TableError):
        TB.bank_from_bytes(recrc(short))
    long_ = v2[:p + 12] + zlib.compress(b"\0" * (4 * counts.numel() + 4)) + b"\0\0\0\0"
    with pytest.raises(TB.TableError):
        TB.bank_from_bytes(recrc(long_))
    huge = v2[:p] + struct.pack("<IIHH", 4096, 65536, 256, 0) + zlib.compress(b"\0" * 1000) + b"\0\0\0\0"
    with pytest.raises(TB.TableError):
        TB.bank_from_bytes(recrc(huge))
    # the newest registered bank of a model wins
    b1 = TB.register_bank(TB.bank_to_bytes("unit-pick", counts))
    b2 = TB.register_bank(TB.bank_to_bytes("unit-pick", counts + 1))
    assert TB.bank_for("unit-pick", 3, 8).hash == b2.hash
    TB.register_bank(b1)
    assert TB.bank_for("unit-pick", 3, 8).hash == b1.hash


def test_bundled_default_profile():
    """The bundled step profile and per-channel bank give a shared-table default for SmolLM2."""
    pr = P.get("default", 30, MODEL)
    assert pr.k.mode == pr.v.mode == "channel_delta" and pr.k.exact == 1
    assert pr.k.ch_step is not None and pr.k.ch_step[0].shape == (192,)
    bank = TB.bank_for(MODEL, 30, 192)
    assert bank is not None and bank.channels == 192 and bank.bins_max >= pr.bins_max()
    kv = _kv(30, 40, 3, 64, seed=2)
    data = codec.encode(kv, "default", chunk_tokens=32, model=MODEL)
    assert codec.inspect(data).table_mode == "shared"
    assert torch.equal(codec.decode(data), _expected(kv, pr, 32))
    # without the model: the std-relative fallback, still exact-sink, per-chunk tables
    pr0 = P.get("default", 3)
    assert pr0.k.ch_step is None and pr0.k.exact == 1
    # old containers of the previous default still find their bundled bank
    assert any(b.model == MODEL and b.channels == 1 for b in TB._REGISTRY.values())


pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def smol():
    from kvkernels.eval import ppl
    try:
        ppl.gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return ppl.load_smollm2("cpu", torch.float32)


def test_default_beats_cachegen_perplexity(smol):
    from kvkernels.eval import codec_quality as cq

    model, tok = smol
    ids = cq.tokens(tok, cq.TEXTS["Persuasion"], 256)
    L = model.config.num_hidden_layers
    base, kv = cq.run(model, ids)
    res, size = {}, {}
    for name in ("cachegen", "default"):
        pr = P.get(name, L, cq.MODEL_NAME)
        data = codec.encode(kv[:, :, :128], pr, chunk_tokens=64, model=cq.MODEL_NAME)
        assert codec.verify(data).preset == name
        size[name] = len(data)
        p, _ = cq.run(model, ids, cq.fake_quant(pr, 128))
        res[name] = p
    # CacheGen as released loses tens of percent; the default stays within a few percent
    assert res["default"] < res["cachegen"]
    assert res["default"] < base * 1.03
    assert size["default"] < size["cachegen"]
