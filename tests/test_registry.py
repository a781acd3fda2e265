"""Every registered op has its layers: reference (torch backend), Triton file, .cu file, tests,
and a bench case, all under the op family's one name (see CONTRIBUTING.md)."""
import pathlib
import re

import pytest

import kvkernels  # noqa: F401  (registers the ops)
from kvkernels import dispatch
from bench.cases import CASES

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _family(op):
    return dispatch._REGISTRY[op]["torch"][0].module.rsplit(".", 1)[-1]


@pytest.mark.parametrize("op", dispatch.ops())
def test_op_has_every_layer(op):
    backends = dispatch.backends_of(op)
    assert "torch" in backends, f"{op}: no torch reference registered"
    fam = _family(op)
    for path in (f"kvkernels/reference/{fam}.py", f"kvkernels/triton_kernels/{fam}.py", f"csrc/{fam}.cu",
                 f"kvkernels/cuda/{fam}.py", f"python/{fam}.cpp", f"tests/test_{fam}.py", f"bench/cases/{fam}.py"):
        assert (ROOT / path).exists(), f"{op}: missing {path}"
    assert op in CASES, f"{op}: no bench case in bench/cases/{fam}.py"
    tests = (ROOT / f"tests/test_{fam}.py").read_text()
    assert re.search(rf"\b{op}(_op)?\b", tests), f"{op}: tests/test_{fam}.py never calls it"
    readme = (ROOT / "README.md").read_text()
    assert f"`{op}`" in readme, f"{op}: no row in the README's op table"


def test_ops_registered():
    assert {"quantize", "dequantize"} <= set(dispatch.ops())
