"""Formats are strict values: one ASCII grammar, validated constructors, parse(str(f)) == f;
QuantizedKV validates its fields on construction, naming the field."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvkernels
from kvkernels.formats import FP8_SCOPES, INT_AXES, INT_BITS, MAX_GROUP_SIZE, QuantFormat, QuantizedKV

SETTINGS = settings(max_examples=150, deadline=None)


def formats():
    ints = st.builds(QuantFormat.int, st.sampled_from(INT_BITS), st.integers(1, MAX_GROUP_SIZE),
                     st.sampled_from(INT_AXES))
    return st.one_of(ints, st.builds(QuantFormat.fp8, st.sampled_from(FP8_SCOPES)))


def spellings(f):
    """Every string the grammar accepts for ``f`` (canonical form, defaults omitted, fp8 alias)."""
    if f.kind == "fp8":
        heads = ("fp8", "fp8_e4m3")
        return {f"{h}:{f.scope}" for h in heads} | (set(heads) if f.scope == "token_head" else set())
    s = f"int{f.bits}:g{f.group_size}"
    return {f"{s}:{f.axis}"} | ({s} if f.axis == "channel" else set())


@SETTINGS
@given(formats())
def test_parse_str_roundtrip(f):
    assert QuantFormat.parse(str(f)) == f
    assert str(f) in spellings(f)
    for s in spellings(f):
        assert QuantFormat.parse(s) == f
    assert hash(QuantFormat.parse(str(f))) == hash(f)


def _near_misses():
    """Valid spellings with one character inserted, replaced or deleted (signs, spaces,
    underscores, non-ASCII digits, case)."""
    alphabet = st.sampled_from(list("0123456789:g_+- \t\n٤३０") + ["int", "fp8", "G", "I", "e"])

    @st.composite
    def mutate(draw):
        s = sorted(spellings(draw(formats())))[draw(st.integers(0, 1)) % 1]
        i = draw(st.integers(0, len(s)))
        op = draw(st.sampled_from(["insert", "replace", "delete", "upper"]))
        c = draw(alphabet)
        if op == "insert":
            return s[:i] + c + s[i:]
        if op == "replace":
            return s[:i] + c + s[i + 1:]
        if op == "delete":
            return s[:i] + s[i + 1:]
        return s.upper()

    return mutate()


@SETTINGS
@given(st.one_of(st.text(max_size=24), _near_misses()))
def test_parse_accepts_exactly_the_grammar(s):
    """Any string either parses to a format it is a spelling of, or raises ValueError."""
    try:
        f = QuantFormat.parse(s)
    except ValueError as e:
        assert str(e).split(":")[0] in ("format", "bits", "group_size", "axis", "scope"), str(e)
        return
    assert s in spellings(f), f"{s!r} parsed as {f} but is not one of its spellings"


@pytest.mark.parametrize("spec,word", [
    ("int 4:g32", "bits"), ("int+4:g+32", "bits"), ("int4:g1_6:channel", "group_size"), ("int4:g+32", "group_size"),
    ("int4:g 32", "group_size"), ("int4:g٣٢", "group_size"), ("int٤:g32", "bits"), ("int4:g032", "group_size"),
    ("int08:g32", "bits"), ("int4:g32:", "axis"), ("int4", "format"), ("int4:32", "group_size"),
    ("int4:g32:channel:x", "format"), ("fp8:head:g32", "format"), ("fp8:", "scope"), ("INT4:g32", "format"),
    (" fp8", "format"), ("fp8 ", "format"), ("fp8\n", "format"), ("", "format"),
    ("int4:g65537:token", "group_size"), ("int4:g1000000:token", "group_size"), ("int4:g2147483648", "group_size"),
    ("int4:g" + "9" * 5000, "group_size"), ("int4:g0", "group_size"),
])
def test_parse_refuses(spec, word):
    with pytest.raises(ValueError, match=f"^{word}:"):
        QuantFormat.parse(spec)


def test_group_size_bound():
    assert QuantFormat.parse(f"int4:g{MAX_GROUP_SIZE}:token").group_size == MAX_GROUP_SIZE
    with pytest.raises(ValueError, match="^group_size: expected an int in 1..65536"):
        QuantFormat.int(4, MAX_GROUP_SIZE + 1, "token")
    with pytest.raises(ValueError, match="^group_size"):
        QuantFormat.int(4, 2**31, "token")


@pytest.mark.parametrize("args,exc,word", [
    ((4.0, 32), TypeError, "bits"), ((4, True), TypeError, "group_size"), ((True, 32), TypeError, "bits"),
    (("4", 32), TypeError, "bits"), ((4, 32.0), TypeError, "group_size"), ((4, "32"), TypeError, "group_size"),
    ((4, np.float64(32)), TypeError, "group_size"), ((4, np.bool_(True)), TypeError, "group_size"),
    ((4, torch.tensor(32)), TypeError, "group_size"), ((4, 32, 1), TypeError, "axis"), ((4, 32, "heads"), ValueError, "axis"),
    ((3, 32), ValueError, "bits"), ((4, -1), ValueError, "group_size"),
])
def test_int_constructor_validates(args, exc, word):
    with pytest.raises(exc, match=f"^{word}:"):
        QuantFormat.int(*args)


def test_numpy_integers_accepted_for_both_fields():
    for it in (np.int8, np.int32, np.int64, np.uint16):
        f = QuantFormat.int(it(4), it(32), "token")
        assert f == QuantFormat.int(4, 32, "token") and type(f.bits) is int and type(f.group_size) is int
        assert str(f) == "int4:g32:token" and QuantFormat.parse(str(f)) == f


@pytest.mark.parametrize("kw,word", [
    (dict(kind="fp8", group_size=32), "group_size"), (dict(kind="fp8", axis="token"), "axis"),
    (dict(kind="fp8", bits=4), "bits"), (dict(kind="int", bits=4, group_size=32, scope="head"), "scope"),
    (dict(kind="fp8", scope="layer"), "scope"), (dict(kind="float"), "kind"), (dict(kind=8), "kind"),
    (dict(kind="fp8", scope=None), "scope"),
])
def test_unused_fields_refused(kw, word):
    with pytest.raises((ValueError, TypeError), match=f"^{word}:"):
        QuantFormat(**kw)


# ---- QuantizedKV -----------------------------------------------------------------------------
def _q(spec="int4:g32:channel"):
    return kvkernels.quantize(torch.randn(8, 2, 64), spec, backend="torch")


def test_quantized_kv_format_string_parsed():
    q = _q()
    q2 = QuantizedKV(q.codes, q.scale, q.zero, "int4:g32:channel", q.dtype, 64)
    assert q2.format == q.format
    assert torch.equal(kvkernels.dequantize(q2, backend="torch"), kvkernels.dequantize(q, backend="torch"))
    with pytest.raises(ValueError, match="^group_size"):
        QuantizedKV(q.codes, q.scale, q.zero, "int4:g+32:channel", q.dtype, 64)
    with pytest.raises(TypeError, match="^format"):
        QuantizedKV(q.codes, q.scale, q.zero, 4, q.dtype, 64)


@pytest.mark.parametrize("field,value,exc", [
    ("head_dim", 64.0, TypeError), ("head_dim", "64", TypeError), ("head_dim", True, TypeError),
    ("head_dim", 0, ValueError), ("head_dim", 128, ValueError), ("dtype", "bfloat16", TypeError),
    ("dtype", torch.int32, TypeError), ("codes", [1, 2], TypeError), ("scale", None, TypeError),
    ("zero", None, TypeError),
])
def test_quantized_kv_validates_fields(field, value, exc):
    q = _q()
    kw = dict(codes=q.codes, scale=q.scale, zero=q.zero, format=q.format, dtype=q.dtype, head_dim=q.head_dim)
    kw[field] = value
    word = "codes" if (field, value) == ("head_dim", 128) else field  # a head_dim the codes do not hold
    with pytest.raises(exc, match=f"^{word}:"):
        QuantizedKV(**kw)


def test_quantized_kv_zero_on_fp8_refused():
    q = _q("fp8:head")
    with pytest.raises(ValueError, match="^zero: expected None"):
        QuantizedKV(q.codes, q.scale, torch.zeros_like(q.scale), q.format, q.dtype, 64)


def test_quantized_kv_numpy_head_dim():
    q = _q()
    q2 = QuantizedKV(q.codes, q.scale, q.zero, q.format, q.dtype, np.int64(64))
    assert type(q2.head_dim) is int and q2.shape == (8, 2, 64)


def test_quantized_kv_size1_last_dim_dense():
    x = torch.randn(5, 2, 1)
    q = kvkernels.quantize(x, "fp8:token_head", backend="torch")
    # a lone element per row: its stride is free (here 7), the codes still count as contiguous
    codes = torch.empty(5 * 2 + 7, dtype=torch.float8_e4m3fn).as_strided((5, 2, 1), (2, 1, 7))
    codes.copy_(q.codes)
    assert codes.stride(-1) == 7
    q2 = QuantizedKV(codes, q.scale, None, q.format, q.dtype, 1)
    out = torch.empty(5, 2, 4)[..., 2:3]  # an output of head_dim 1 inside a wider tensor
    kvkernels.dequantize(q2, out=out, backend="torch")
    assert torch.equal(out, kvkernels.dequantize(q, torch.float32, backend="torch"))
    assert torch.equal(kvkernels.dequantize(q2, backend="torch"), kvkernels.dequantize(q, backend="torch"))
