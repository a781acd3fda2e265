"""The registered ops are safe without the Python API in front of them.

Engines call ``torch.ops.kvkernels.quantize`` / ``dequantize`` directly with their own buffers.
Every buffer is checked against the format before dispatch (kvkernels/_validate.py), so a
mis-sized, mis-typed or self-overlapping buffer is refused with ValueError/TypeError naming it
on every backend, before anything is written. The mis-sized cases run in a subprocess
(scripts/sanitize_quant.py: the same script the lead runs under compute-sanitizer on the GPU),
so that a crash (the Triton path used to SIGSEGV / corrupt the heap) fails the test instead of
killing the run.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import kvkernels  # noqa: F401
from kvkernels import _validate
from kvkernels.formats import QuantFormat

from conftest import DEVICE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "sanitize_quant.py")


def _run_script(backend):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    if backend == "triton" and not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    res = subprocess.run([sys.executable, SCRIPT, "--backend", backend], env=env, capture_output=True, text=True,
                         timeout=900)
    lines = res.stdout.strip().splitlines()
    last_case = next((ln for ln in reversed(lines) if ln.startswith("case:")), "?")
    assert res.returncode in (0, 1), (f"the process died (rc {res.returncode}) in {last_case!r}:\n"
                                      f"{res.stderr[-3000:]}")
    report = json.loads(lines[-1])
    assert report["cases"] >= 39
    assert not report["failures"], "\n".join(report["failures"])
    assert res.returncode == 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_misfit_buffers_refused_in_subprocess(backend):
    """Codes smaller than x implies, one-element codes, too-small or single broadcast scales,
    missing / extra zero points, strided outputs, overlapping outputs, oversized groups: each
    refused naming the argument, nothing written; then well-formed calls match the reference."""
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("on a GPU: test_misfit_buffers_refused_gpu runs the triton and cuda backends")
    _run_script(backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the CUDA and Triton GPU backends)")
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_misfit_buffers_refused_gpu(backend):
    """The same cases on the GPU (CUDA: through the op and through the launchers directly)."""
    if backend == "cuda":
        from kvkernels.cuda import quant as cq

        why = cq.available()
        if why:
            pytest.skip(why)
    _run_script(backend)


# ---- in-process checks of the validator ------------------------------------------------------
def test_overlap_predicate():
    a = torch.empty(2, 7, 3, 64)
    assert not _validate.has_internal_overlap(a)
    assert not _validate.has_internal_overlap(a.permute(0, 2, 1, 3))          # HND view
    assert not _validate.has_internal_overlap(torch.empty(2, 7, 2, 3, 64)[:, :, 1])  # K|V packed
    assert not _validate.has_internal_overlap(a[:, ::2])                        # a step
    assert not _validate.has_internal_overlap(torch.empty(5, 1, 4).expand(5, 1, 4))
    assert not _validate.has_internal_overlap(torch.empty(1, 3).as_strided((1, 3), (0, 1)))  # size-1 dim, stride 0
    assert _validate.has_internal_overlap(torch.empty(2, 1, 3, 64).expand(2, 7, 3, 64))
    assert _validate.has_internal_overlap(torch.empty(100).as_strided((7, 64), (2, 1)))
    assert _validate.has_internal_overlap(torch.empty(100).as_strided((3, 3), (1, 1)))


def test_check_tensor_messages():
    t = torch.empty(2, 3)
    with pytest.raises(TypeError, match=r"^buf: expected a torch.Tensor, got list"):
        _validate.check_tensor("buf", [1])
    with pytest.raises(TypeError, match=r"^buf: expected dtype torch.float16 or torch.bfloat16"):
        _validate.check_tensor("buf", t, dtype=(torch.float16, torch.bfloat16))
    with pytest.raises(ValueError, match=r"^buf: expected shape \(3, 2\)"):
        _validate.check_tensor("buf", t, shape=(3, 2))
    with pytest.raises(ValueError, match=r"^buf: expected a contiguous tensor"):
        _validate.check_tensor("buf", t.t(), contiguous=True)
    with pytest.raises(ValueError, match=r"^buf: the last dim must be dense"):
        _validate.check_tensor("buf", t.t(), dense_last=True)
    with pytest.raises(ValueError, match=r"^buf: elements overlap"):
        _validate.check_tensor("buf", torch.empty(2, 1).expand(2, 3), no_overlap=True)
    with pytest.raises(ValueError, match=r"^buf: expected a tensor on meta"):
        _validate.check_tensor("buf", t, device=torch.device("meta"))
    _validate.check_tensor("buf", torch.empty(3, 1).t(), dense_last=True)  # size-1 last dim: dense


def test_size1_last_dim_counts_as_dense():
    """head_dim 1 with a last-dim stride other than 1 (a column of a wider tensor) is dense."""
    base = torch.randn(1, 9, 2, 3, device=DEVICE)
    x = base[..., 1:2]                     # stride(-1) 1, but ...
    x = x.as_strided(x.shape, (*x.stride()[:3], 5))  # ... any stride is fine for a lone element
    assert x.stride(-1) == 5
    q = kvkernels.quantize(x, "fp8:token_head", backend="torch")
    ref = kvkernels.quantize(x.contiguous(), "fp8:token_head", backend="torch")
    assert torch.equal(q.codes.view(torch.uint8), ref.codes.view(torch.uint8))
    out = torch.empty(1, 9, 2, 4, device=DEVICE)[..., :1]
    out = out.as_strided(out.shape, (*out.stride()[:3], 3))
    kvkernels.dequantize(q, out=out, backend="torch")
    assert torch.equal(out, kvkernels.dequantize(ref, torch.float32, backend="torch"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dequantize_out_overlap_refused_public(backend):
    """dequantize(out=expanded view) is refused by the public API too, whatever the backend."""
    q = kvkernels.quantize(torch.randn(7, 2, 64, device=DEVICE), "int4:g32:channel", backend="torch")
    out = torch.full((1, 2, 64), 3.0, device=DEVICE).expand(7, 2, 64)
    with pytest.raises(ValueError, match="^out: elements overlap"):
        kvkernels.dequantize(q, out=out, backend=backend)
    assert (out == 3.0).all()


def test_fake_kernels_check_too():
    """Under torch.compile the fake kernels see the buffers first: they refuse the same cases."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(1, 5, 2, 64)
        codes = torch.empty(1, 5, 2, 16, dtype=torch.uint8)  # int4 needs 32 bytes a row
        scale = torch.empty(1, 5, 2, 2)
        with pytest.raises(ValueError, match="^codes: expected shape"):
            torch.ops.kvkernels.quantize(x, "int4:g32:channel", codes, scale, torch.empty_like(scale), True, None)
        out = torch.empty(1, 1, 2, 64).expand(1, 5, 2, 64)
        with pytest.raises(ValueError, match="^out: elements overlap"):
            torch.ops.kvkernels.dequantize(torch.empty(1, 5, 2, 64, dtype=torch.uint8), torch.empty(1, 5, 2), None,
                                           "fp8:token_head", out, None)


def test_op_accepts_uint8_view_of_fp8_codes():
    """fp8 codes may come as float8_e4m3fn or as their uint8 bytes (what engines often hold)."""
    f = QuantFormat.parse("fp8:head")
    x = torch.randn(1, 5, 2, 64, device=DEVICE)
    for dt in (torch.uint8, torch.float8_e4m3fn):
        codes = torch.empty(f.codes_shape(1, 5, 2, 64), dtype=dt, device=DEVICE)
        scale = torch.empty(f.scale_shape(1, 5, 2, 64), device=DEVICE)
        torch.ops.kvkernels.quantize(x, str(f), codes, scale, None, True, "torch")
    with pytest.raises(TypeError, match="^codes: expected dtype torch.float8_e4m3fn or torch.uint8"):
        torch.ops.kvkernels.quantize(x, str(f), codes.view(torch.int8), scale, None, True, "torch")
