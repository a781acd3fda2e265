"""Codec container and presets: round trips, partial decode, inspect/verify, untrusted input."""
import random
import struct
import time
import zlib

import pytest
import torch

from kvkernels import codec
from kvkernels.codec import container as ct
from kvkernels.codec import presets as P
from kvkernels.codec import tables as TB

PRESETS = ("cachegen", "default")
CODERS = ("rans", "ac")


def _kv(L=3, T=77, H=2, D=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(2, L, T, H, D, generator=g)
    kv[0, :, :, :, 3] *= 8  # an outlier key channel
    kv[:, :, 0] *= 5  # a sink-like first token
    return kv.to(dtype)


def _symbols(kv, preset, chunk):
    """Symbols [2][L] of each chunk, as the preset computes them (the exact round-trip target)."""
    _, L, T, H, D = kv.shape
    Pr = P.get(preset, L)
    x = kv.float().reshape(2, L, T, H * D)
    out = []
    for k in range(2):
        for l in range(L):
            for t0 in range(0, T, chunk):
                out.append(P.quantize(x[k, l, t0:t0 + chunk].unsqueeze(0), Pr.kind(k), l))
    return out


def _expected(kv, preset, chunk, dtype=None):
    """decode()'s exact expected output: the preset's fake quantization, chunk by chunk."""
    _, L, T, H, D = kv.shape
    Pr = P.get(preset, L)
    x = kv.float().reshape(2, L, T, H * D)
    y = torch.stack([torch.stack([P.fake_quant_layer(x[k, l], Pr.kind(k), l, chunk) for l in range(L)])
                     for k in range(2)])
    return y.reshape(2, L, T, H, D).to(dtype or kv.dtype)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("coder", CODERS)
@pytest.mark.parametrize("shape,chunk", [((3, 77, 2, 16), 32), ((1, 1, 1, 8), 256), ((12, 40, 1, 40), 16),
                                         ((2, 64, 2, 32), 64)])
def test_round_trip_exact(preset, coder, shape, chunk):
    L, T, H, D = shape
    kv = _kv(L, T, H, D, seed=L * T)
    data = codec.encode(kv, preset, chunk_tokens=chunk, coder=coder)
    assert isinstance(data, bytes)
    y = codec.decode(data)
    assert y.shape == kv.shape and y.dtype == kv.dtype
    # decoded values are exactly the preset's dequantized symbols: the symbols round-tripped
    assert torch.equal(y, _expected(kv, preset, chunk))
    info = codec.verify(data)
    assert (info.L, info.T, info.H, info.D, info.chunk_tokens, info.coder) == (L, T, H, D, chunk, coder)
    assert info.n_chunks == -(-T // chunk) and info.nbytes == len(data) and info.preset == preset


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtypes(dtype):
    kv = _kv(2, 50, 2, 8, dtype=dtype)
    data = codec.encode(kv, "default", chunk_tokens=32)
    assert codec.inspect(data).dtype == dtype
    assert torch.equal(codec.decode(data), _expected(kv, "default", 32))
    assert codec.decode(data, dtype=torch.float32).dtype == torch.float32


def _bound(kv, preset, chunk):
    """Per-element error bound of each preset: half a step (+ fp16 rounding of the scales)."""
    _, L, T, H, D = kv.shape
    Pr = P.get(preset, L)
    x = kv.float().reshape(2, L, T, H * D)
    b = torch.zeros_like(x)
    for k in range(2):
        spec = Pr.kind(k)
        for l in range(L):
            for t0 in range(0, T, chunk):
                seg = x[k, l, t0:t0 + chunk]
                if spec.mode == "token_sym":
                    M = spec.bins[l] // 2 - 1
                    step = seg.abs().amax(1, keepdim=True) / M
                    b[k, l, t0:t0 + chunk] = (0.5 * step + 1e-3 * seg.abs()).expand_as(seg)
                else:
                    std = seg.std(0, unbiased=False, keepdim=True)
                    step = spec.step[l] * std
                    lim = (spec.bins[l] // 2 - 1) * step
                    dev = (seg - seg.mean(0, keepdim=True)).abs()
                    # inside the clamp range half a step, outside the clamp error
                    b[k, l, t0:t0 + chunk] = torch.where(dev <= lim, 0.5 * step.expand_as(seg), dev - lim + step) \
                        + 1e-3 * (seg.abs() + std)
    return b.reshape(kv.shape)


@pytest.mark.parametrize("preset", PRESETS)
def test_lossy_bound(preset):
    kv = _kv(3, 100, 2, 16, seed=3)
    y = codec.decode(codec.encode(kv, preset, chunk_tokens=40))
    err = (y - kv).abs()
    assert bool((err <= _bound(kv, preset, 40)).all())
    assert float(err.mean()) < 0.2 * float(kv.abs().mean())


@pytest.mark.parametrize("coder", CODERS)
@pytest.mark.parametrize("preset", PRESETS)
def test_partial_decode(coder, preset):
    kv = _kv(5, 100, 2, 8, seed=5)
    data = codec.encode(kv, preset, chunk_tokens=24, coder=coder)
    full = codec.decode(data)
    for layers, chunks in [(range(1, 4), range(2, 5)), (range(0, 1), None), (None, range(4, 5)), (range(4, 5), range(0, 1))]:
        y = codec.decode(data, layers=layers, chunks=chunks)
        lr = layers or range(5)
        cr = chunks or range(5)
        assert torch.equal(y, full[:, lr.start:lr.stop, cr.start * 24:min(100, cr.stop * 24)])


def test_partial_decode_touches_only_its_bytes():
    kv = _kv(4, 96, 2, 8, seed=6)
    data = bytearray(codec.encode(kv, "cachegen", chunk_tokens=32))
    ref = codec.decode(bytes(data), layers=range(1, 2), chunks=range(1, 2))
    h = ct._parse_header(memoryview(bytes(data)))
    d = ct._layer_dir(memoryview(bytes(data)), h, 1)
    keep = set(range(h.info.nbytes - 4 - 0, h.info.nbytes - 4))  # nothing from the trailer needed
    keep = set(range(0, h.chunk_dir[0][0]))  # header
    off, ln = h.chunk_dir[1]
    keep |= set(range(off, off + 8 * 5)) | set(range(off + ln - 4, off + ln))  # chunk 1's directory + CRC
    keep |= set(range(d[1], d[2]))  # layer 1's record
    scrambled = bytearray(random.Random(0).randbytes(len(data)))
    for i in keep:
        scrambled[i] = data[i]
    assert torch.equal(codec.decode(bytes(scrambled), layers=range(1, 2), chunks=range(1, 2)), ref)


def test_inspect_and_bad_arguments():
    kv = _kv(2, 10, 1, 8)
    data = codec.encode(kv, "cachegen", chunk_tokens=4, model="m")
    info = codec.inspect(data)
    assert (info.version, info.model, info.preset, info.coder, info.n_chunks) == (1, "m", "cachegen", "rans", 3)
    assert info.bits_per_element == 8 * len(data) / kv.numel()
    with pytest.raises(ValueError, match="layers"):
        codec.decode(data, layers=range(0, 3))
    with pytest.raises(ValueError, match="chunks"):
        codec.decode(data, chunks=range(2, 2))
    with pytest.raises(TypeError, match="layers"):
        codec.decode(data, layers=[0])
    with pytest.raises(ValueError, match="kv"):
        codec.encode(kv[0])
    with pytest.raises(TypeError, match="kv"):
        codec.encode(kv.to(torch.int32))
    with pytest.raises(ValueError, match="preset"):
        codec.encode(kv, "nope")
    with pytest.raises(ValueError, match="coder"):
        codec.encode(kv, coder="zip")
    with pytest.raises(ValueError, match="chunk_tokens"):
        codec.encode(kv, chunk_tokens=0)
    with pytest.raises(ValueError, match="NaN"):
        codec.encode(torch.full_like(kv, float("nan")))
    with pytest.raises(TypeError):
        codec.decode("text")


def test_table_normalize():
    g = torch.Generator().manual_seed(1)
    counts = torch.randint(0, 50, (40, 32), generator=g)
    counts[0] = 0
    counts[1, 5:] = 0
    for pb in (12, 16):
        f = TB.normalize(counts, 32, pb)
        assert TB.check_freq(f, torch.full((40,), 32), pb) is None
        f16 = TB.normalize(counts, torch.tensor([16] * 40), pb)
        assert bool((f16[:, 16:] == 0).all()) and bool((f16.sum(1) == 1 << pb).all())


def test_shared_bank_round_trip():
    kv = _kv(2, 64, 2, 8, seed=9)
    Pr = P.default(2)
    g = torch.Generator().manual_seed(2)
    counts = torch.randint(0, 1000, (2, 2, 16, Pr.bins_max()), generator=g)
    bank = TB.register_bank(TB.bank_to_bytes("unit-test-model", counts))
    assert TB.bank_from_bytes(bank.data).hash == bank.hash
    for coder in CODERS:
        data = codec.encode(kv, Pr, chunk_tokens=32, coder=coder, model="unit-test-model")
        info = codec.verify(data)
        assert info.table_mode == "shared" and info.table_hash == bank.hash
        assert torch.equal(codec.decode(data), _expected(kv, Pr, 32))
        # no bank for another model: per-chunk tables, same values
        other = codec.encode(kv, Pr, chunk_tokens=32, coder=coder, model="other")
        assert codec.inspect(other).table_mode == "chunk"
        assert torch.equal(codec.decode(other), _expected(kv, Pr, 32))
    # an unknown hash is refused
    del TB._REGISTRY[bank.hash]
    with pytest.raises(codec.CodecError, match="bank"):
        codec.decode(data)
    assert codec.inspect(data).table_mode == "shared"
    TB.register_bank(bank)
    with pytest.raises(TB.TableError):
        TB.bank_from_bytes(bank.data[:-1] + bytes([bank.data[-1] ^ 1]))


# ---------------------------------------------------------------------------------------------
# untrusted input


def _refix(buf: bytearray) -> bytearray:
    """Recompute the header CRC and the trailer CRC (forgeries that pass the outer checks)."""
    hlen = struct.unpack_from("<I", buf, 16)[0]
    if 8 <= hlen <= len(buf):
        struct.pack_into("<I", buf, hlen - 4, zlib.crc32(bytes(buf[:hlen - 4])))
    struct.pack_into("<I", buf, len(buf) - 4, zlib.crc32(bytes(buf[:-4])))
    return buf


def _expect_error_or_same(data: bytes, ref: torch.Tensor, same: bool = True, device: str = "cpu"):
    t0 = time.perf_counter()
    try:
        y = codec.decode(data, device=device)
    except codec.CodecError:
        pass
    else:
        if same:  # only a byte nobody reads (the trailer CRC) may change without an error
            assert torch.equal(y, ref)
        else:  # a forgery that passes every CRC: some well-formed KV of the same shape
            assert y.shape == ref.shape and y.dtype == ref.dtype and bool(torch.isfinite(y).all())
    assert time.perf_counter() - t0 < 5.0


@pytest.fixture(scope="module", params=[("cachegen", "rans"), ("default", "ac"), ("default", "rans")])
def sample(request):
    preset, coder = request.param
    kv = _kv(2, 40, 1, 16, seed=11)
    data = codec.encode(kv, preset, chunk_tokens=16, coder=coder)
    return data, codec.decode(data)


def test_forged_header_fields(sample):
    data, ref = sample
    # (offset, struct format, value)
    forgeries = [(4, "<H", 2), (4, "<H", 0), (6, "<H", 1), (8, "<Q", len(data) + 1), (8, "<Q", 1 << 62),
                 (16, "<I", 1 << 30), (16, "<I", 10), (20, "<B", 7), (21, "<B", 9), (22, "<B", 13),
                 (23, "<B", 5), (24, "<I", 0), (24, "<I", 1 << 20), (28, "<I", 0xFFFFFFFF),
                 (28, "<I", 1 << 24), (28, "<I", 41), (32, "<I", 1 << 16), (36, "<I", 0), (40, "<I", 0),
                 (40, "<I", 1), (44, "<I", 1 << 31), (48, "<H", 60000), (50, "<I", 1 << 31), (54, "<B", 1)]
    for off, fmt, val in forgeries:
        buf = bytearray(data)
        struct.pack_into(fmt, buf, off, val)
        for b in (bytes(buf), bytes(_refix(bytearray(buf)))):
            t0 = time.perf_counter()
            with pytest.raises(codec.CodecError):
                codec.decode(b)
            if (off, val) != (28, 41):  # T + 1 with the same chunk count: a consistent header
                with pytest.raises(codec.CodecError):
                    codec.inspect(b) if off < 54 else codec.verify(b)
            else:
                with pytest.raises(codec.CodecError):
                    codec.verify(b)
            assert time.perf_counter() - t0 < 2.0


def test_claims_2_to_40_tokens_fail_fast(sample):
    data, _ = sample
    buf = bytearray(data)
    struct.pack_into("<I", buf, 28, 0xFFFFFFFF)  # T field is u32: the largest claim it can make
    t0 = time.perf_counter()
    with pytest.raises(codec.CodecError, match="T"):
        codec.decode(bytes(_refix(buf)))
    assert time.perf_counter() - t0 < 0.5


def _forged_records(data: bytes, n: int, seed: int):
    """``n`` copies of ``data`` with one bit of chunk 0 / layer 0's record flipped and every CRC
    (record, header, trailer) fixed: forgeries only the decoder's own checks can catch."""
    h = ct._parse_header(memoryview(data))
    s, e = ct._layer_dir(memoryview(data), h, 0)[:2]
    rng = random.Random(seed)
    for _ in range(n):
        buf = bytearray(data)
        buf[rng.randrange(s, e - 4)] ^= 1 << rng.randrange(8)
        struct.pack_into("<I", buf, e - 4, zlib.crc32(bytes(buf[s:e - 4]), ct._record_seed(0, 0, 16, 16)))
        yield bytes(_refix(buf))


def test_forged_directories_and_tables(sample):
    data, ref = sample
    h = ct._parse_header(memoryview(data))
    base = ct._FIXED.size + len(h.info.model.encode()) + len(ct._presets.Preset.from_config(h.info.preset_config, h.info.L).to_json())
    for c in range(h.info.n_chunks):
        for field, val in ((0, 0), (0, len(data)), (8, 1 << 60), (8, 3)):
            buf = bytearray(data)
            struct.pack_into("<Q", buf, base + 16 * c + field, val)
            with pytest.raises(codec.CodecError):
                codec.decode(bytes(_refix(buf)))
    # layer directory entries forged, with their CRC fixed
    off, ln = h.chunk_dir[0]
    L = h.info.L
    for i, val in ((0, 0), (1, 1 << 50), (L, ln), (1, 8)):
        buf = bytearray(data)
        struct.pack_into("<Q", buf, off + 8 * i, val)
        struct.pack_into("<I", buf, off + ln - 4, zlib.crc32(bytes(buf[off:off + 8 * (L + 1)])))
        with pytest.raises(codec.CodecError):
            codec.decode(bytes(_refix(buf)))
    # record bytes forged with the record CRC fixed: tables that do not sum, lengths, widths...
    d = ct._layer_dir(memoryview(data), h, 0)
    for b in _forged_records(data, 60, seed=7):
        _expect_error_or_same(b, ref, same=False)
    if h.info.table_mode == "chunk":
        buf = bytearray(data)
        s, e = d[0], d[1]
        side = 2 * 16 if h.preset.k.mode == "token_sym" else 4 * 16
        struct.pack_into("<H", buf, s + side, 0)  # first freq of the first table -> 0 / not summing
        struct.pack_into("<I", buf, e - 4, zlib.crc32(bytes(buf[s:e - 4]), ct._record_seed(0, 0, 16, 16)))
        with pytest.raises(codec.CodecError, match="table"):
            codec.decode(bytes(_refix(buf)))


def test_mutation_loop(sample):
    """Seeded random truncations, bit flips, byte runs and splices: CodecError or the same output."""
    data, ref = sample
    rng = random.Random(12345)
    t_start = time.perf_counter()
    for it in range(300):
        buf = bytearray(data)
        op = it % 5
        if op == 0:
            buf = buf[:rng.randrange(len(buf))]
        elif op == 1:
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(len(buf))
                buf[i] ^= 1 << rng.randrange(8)
        elif op == 2:
            i = rng.randrange(len(buf))
            buf[i:i + 8] = rng.randbytes(8)
        elif op == 3:
            i = rng.randrange(len(buf))
            buf = buf[:i] + rng.randbytes(rng.randint(1, 16)) + buf[i:]
        else:
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
            buf = _refix(buf)  # passes the header and trailer CRCs
        b = bytes(buf)
        _expect_error_or_same(b, ref)
        if b != data:
            with pytest.raises(codec.CodecError):
                codec.verify(b)
    assert time.perf_counter() - t_start < 120


def test_preset_config_validation():
    Pr = P.cachegen(4)
    assert P.Preset.from_json(Pr.to_json(), 4) == Pr
    bad = [b"{", b"[]", b'{"name":"x"}', Pr.to_json().replace(b'"token_sym"', b'"other"', 1),
           Pr.to_json().replace(b"32", b"999", 1), Pr.to_json().replace(b'"chunk"', b'"global"')]
    for b in bad:
        with pytest.raises(P.PresetError):
            P.Preset.from_json(b, 4)
    with pytest.raises(P.PresetError):
        P.Preset.from_json(Pr.to_json(), 5)


# ---------------------------------------------------------------------------------------------
# GPU: the batched encode and the one-launch decode


GPU = torch.cuda.is_available()
gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")


@gpu
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_encode_decode_match_the_host(preset, dtype, monkeypatch):
    """encode on the GPU round-trips to the preset's fake quantization computed there; decode
    on the GPU (one fused launch) gives the host decoder's bytes, for partial ranges and every
    output dtype; the one-launch path is the one taken."""
    taken = []
    orig = ct._decode_flat_pages

    def spy(*a, **k):
        r = orig(*a, **k)
        taken.append(r is not None)
        return r
    monkeypatch.setattr(ct, "_decode_flat_pages", spy)
    kv = _kv(5, 100, 2, 16, seed=21, dtype=dtype)
    for dev in ("cpu", "cuda"):
        x = kv.to(dev)
        data = codec.encode(x, preset, chunk_tokens=24)
        want = _expected(x, preset, 24).cpu()
        if dev == "cpu":
            assert torch.equal(codec.decode(data), want)
        else:  # torch on a GPU divides by a scalar as a multiply by its reciprocal (the decoder's
            # map parameters are computed on the host): the same symbols, within an ulp or two
            # (rounded to the KV dtype: one ulp of it where a tie flips)
            got = codec.decode(data).float()
            tol = max(3e-7, torch.finfo(dtype).eps)
            assert bool(((got - want.float()).abs() <= tol * want.float().abs()).all())
        for out_dt in (None, torch.float32, torch.bfloat16):
            for layers, chunks in [(None, None), (range(1, 4), range(2, 5)), (range(4, 5), range(4, 5))]:
                g = codec.decode(data, dtype=out_dt, device="cuda", layers=layers, chunks=chunks)
                h = codec.decode(data, dtype=out_dt, layers=layers, chunks=chunks)
                assert g.device.type == "cuda" and g.dtype == h.dtype and torch.equal(g.cpu(), h)
    assert taken and all(taken)


@gpu
def test_gpu_decode_of_forged_records(sample):
    """Record bytes forged with their CRC fixed, decoded on the GPU: a CodecError or well-formed
    KV of the container's shape (as on the host), never a crash."""
    data, ref = sample
    for b in _forged_records(data, 40, seed=8):
        _expect_error_or_same(b, ref, same=False, device="cuda")
    torch.cuda.synchronize()
