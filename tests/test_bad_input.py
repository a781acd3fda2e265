"""Bad input -> ValueError/TypeError naming the argument, before anything is written."""
import pytest
import torch

import kvkernels
from kvkernels.formats import QuantizedKV

from conftest import DEVICE


def x3(**kw):
    return torch.randn(8, 2, 64, device=DEVICE, **kw)


@pytest.mark.parametrize("spec,exc,word", [
    ("int3:g32:channel", ValueError, "bits"),
    ("int4:g0:channel", ValueError, "group_size"),
    ("int4:g32:heads", ValueError, "axis"),
    ("fp8:layer", ValueError, "scope"),
    ("float4", ValueError, "format"),
    (42, TypeError, "format"),
])
def test_bad_format(spec, exc, word):
    with pytest.raises(exc, match=word):
        kvkernels.quantize(x3(), spec)


@pytest.mark.parametrize("make,exc,word", [
    (lambda: torch.randint(0, 9, (8, 2, 64), device=DEVICE), TypeError, "x: expected dtype"),
    (lambda: [[1.0]], TypeError, "x: expected a torch.Tensor"),
    (lambda: torch.randn(8, 64, device=DEVICE), ValueError, r"x: expected shape"),
    (lambda: torch.randn(8, 64, 2, device=DEVICE).transpose(1, 2), ValueError, "dense"),
    (lambda: torch.randn(0, 2, 64, device=DEVICE), ValueError, "non-empty"),
    (lambda: torch.randn(8, 2, 48, device=DEVICE), ValueError, "group_size 32 must divide head_dim 48"),
])
def test_bad_x(make, exc, word):
    with pytest.raises(exc, match=word):
        kvkernels.quantize(make(), "int4:g32:channel")


def test_head_dim_not_packable():
    with pytest.raises(ValueError, match="multiple of 4"):
        kvkernels.quantize(torch.randn(8, 2, 30, device=DEVICE), "int2:g32:token")


@pytest.mark.parametrize("scale,exc,word", [
    (torch.ones(3, device=DEVICE), ValueError, "scale: expected shape"),
    (torch.ones(2, dtype=torch.float16, device=DEVICE), TypeError, "scale: expected dtype"),
    (1.0, TypeError, "scale: expected a torch.Tensor"),
])
def test_bad_scale(scale, exc, word):
    with pytest.raises(exc, match=word):
        kvkernels.quantize(x3(), "fp8:head", scale=scale)


def test_scale_for_int_format():
    with pytest.raises(ValueError, match="only fp8"):
        kvkernels.quantize(x3(), "int8:g64:channel", scale=torch.ones(1, device=DEVICE))


def test_bad_backend_names():
    with pytest.raises(ValueError, match="backend"):
        kvkernels.quantize(x3(), "fp8", backend="cuDNN")


def test_env_override(monkeypatch):
    monkeypatch.setenv("KVKERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="KVKERNELS_BACKEND"):
        kvkernels.quantize(x3(), "fp8")
    monkeypatch.setenv("KVKERNELS_BACKEND", "torch")
    q = kvkernels.quantize(x3(), "fp8")
    assert q.codes.dtype == torch.float8_e4m3fn


@pytest.mark.skipif(DEVICE == "cuda", reason="the refusal below is for CPU tensors")
def test_refusal_lists_reason():
    with pytest.raises(kvkernels.BackendError, match="cuda:"):
        kvkernels.quantize(x3(), "fp8", backend="cuda")


def _q():
    return kvkernels.quantize(x3(), "int4:g32:channel")


@pytest.mark.parametrize("tamper,exc,word", [
    (lambda q: setattr(q, "scale", q.scale[..., :1].clone()), ValueError, "q.scale: expected shape"),
    (lambda q: setattr(q, "zero", None), TypeError, "q.zero"),
    (lambda q: setattr(q, "codes", q.codes.to(torch.int16)), TypeError, "q.codes: expected dtype"),
    (lambda q: setattr(q, "head_dim", 96), ValueError, "q.codes: last dim"),
    (lambda q: setattr(q, "codes", q.codes[:, :, :16]), ValueError, "q.codes"),
    (lambda q: setattr(q, "scale", q.scale.double()), TypeError, "q.scale: expected dtype"),
])
def test_bad_container(tamper, exc, word):
    q = _q()
    tamper(q)
    with pytest.raises(exc, match=word):
        kvkernels.dequantize(q)


def test_bad_out():
    q = _q()
    with pytest.raises(ValueError, match="out: expected shape"):
        kvkernels.dequantize(q, out=torch.empty(8, 2, 32, device=DEVICE))
    with pytest.raises(TypeError, match="out: dtype"):
        kvkernels.dequantize(q, torch.float16, out=torch.empty(8, 2, 64, device=DEVICE))
    with pytest.raises(TypeError, match="dtype"):
        kvkernels.dequantize(q, torch.int32)
    with pytest.raises(TypeError, match="q: expected a QuantizedKV"):
        kvkernels.dequantize(q.codes)


def test_nothing_written_on_error():
    q = _q()
    out = torch.full((8, 2, 64), 7.0, device=DEVICE)
    with pytest.raises(ValueError, match="scale: expected shape"):  # refused on construction
        QuantizedKV(q.codes, q.scale[..., :1].clone(), q.zero, q.format, q.dtype, q.head_dim)
    q.scale = q.scale[..., :1].clone()  # ... and when a field is reassigned later
    with pytest.raises(ValueError, match="q.scale: expected shape"):
        kvkernels.dequantize(q, out=out)
    assert (out == 7.0).all()
