"""Mis-sized / mis-typed / overlapping buffers fed to the registered quantize / dequantize ops.

Every case must be refused with ``ValueError`` / ``TypeError`` naming the argument, before
anything is written (each buffer is compared with its copy afterwards); a crash, a silent
success or a write fails. After the refusals one well-formed call per op must run and match the
torch reference (so the script is not refusing everything). With ``--backend cuda`` every case
is also fed to the CUDA launchers directly (``kvkernels.cuda.quant.*_into``), which must refuse
it too: they hand raw pointers to C++.

    python3 scripts/sanitize_quant.py --backend torch            # CPU (tests/test_quant_ops_safety.py)
    TRITON_INTERPRET=1 python3 scripts/sanitize_quant.py --backend triton
    compute-sanitizer --tool memcheck python3 scripts/sanitize_quant.py --backend cuda   # on a GPU

Prints one line per case (flushed before the case runs, so a crash names it), then a JSON line
``{"backend": ..., "cases": n, "failures": [...]}``; exits 1 if any case failed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kvkernels  # noqa: E402,F401  (registers the ops)
from kvkernels.formats import QuantFormat  # noqa: E402

L, T, H, D = 2, 7, 3, 64


def _bufs(spec, device, dtype=torch.bfloat16):
    """A well-formed set of buffers for ``spec``: x, codes, scale, zero, out (poisoned outputs)."""
    f = QuantFormat.parse(spec)
    x = torch.randn(L, T, H, D, device=device).to(dtype)
    codes = torch.full(f.codes_shape(L, T, H, D), 0xAB, dtype=torch.uint8, device=device)
    scale = torch.full(f.scale_shape(L, T, H, D), 0.25, device=device)
    zero = torch.full_like(scale, -0.5) if f.has_zero else None
    out = torch.full((L, T, H, D), 7.0, dtype=dtype, device=device)
    return dict(x=x, codes=codes, scale=scale, zero=zero, out=out)


def _expanded_out(device):
    return torch.full((L, 1, H, D), 7.0, dtype=torch.bfloat16, device=device).expand(L, T, H, D)


def _overlapping_out(device):
    # tokens two channels apart: rows overlap without any stride 0
    base = torch.full((L * T * H * D,), 7.0, dtype=torch.bfloat16, device=device)
    return base.as_strided((L, T, H, D), (T * H * D, 2, H * D, 1))


# (name, op, spec, {buffer: replacement(bufs, device)}, extra kwargs, expected exception, word in message)
CASES = [
    # ---- quantize: outputs smaller than x implies, wrong dtypes / layouts, broadcast scales
    ("q codes one token short", "q", "int4:g32:channel", {"codes": lambda b, d: b["codes"][:, :-1].contiguous()}, {}, ValueError, "codes"),
    ("q codes half the bytes", "q", "int8:g32:token", {"codes": lambda b, d: b["codes"][..., :D // 2].contiguous()}, {}, ValueError, "codes"),
    ("q codes one element", "q", "fp8:tensor", {"codes": lambda b, d: torch.zeros(1, 1, 1, 1, dtype=torch.uint8, device=d)}, {}, ValueError, "codes"),
    ("q codes flat", "q", "int2:g32:channel", {"codes": lambda b, d: b["codes"].flatten()}, {}, ValueError, "codes"),
    ("q codes float32", "q", "int4:g32:channel", {"codes": lambda b, d: torch.zeros(b["codes"].shape, device=d)}, {}, TypeError, "codes"),
    ("q codes strided", "q", "int8:g64:channel", {"codes": lambda b, d: torch.zeros(L, H, T, D, dtype=torch.uint8, device=d).transpose(1, 2)}, {}, ValueError, "codes"),
    ("q scale too small", "q", "int4:g32:channel", {"scale": lambda b, d: b["scale"][..., :1].contiguous()}, {}, ValueError, "scale"),
    ("q scale single (broadcast)", "q", "int4:g16:channel", {"scale": lambda b, d: torch.ones(1, device=d)}, {}, ValueError, "scale"),
    ("q scale 1x1x1x1 (broadcast)", "q", "fp8:token_head", {"scale": lambda b, d: torch.ones(1, 1, 1, 1, device=d)}, {}, ValueError, "scale"),
    ("q scale one token group short", "q", "int2:g4:token", {"scale": lambda b, d: b["scale"][:, :-1].contiguous(),
                                                               "zero": lambda b, d: b["zero"][:, :-1].contiguous()}, {}, ValueError, "scale"),
    ("q scale float16", "q", "fp8:head", {"scale": lambda b, d: b["scale"].half()}, {}, TypeError, "scale"),
    ("q scale strided", "q", "fp8:token_head", {"scale": lambda b, d: torch.ones(L, H, T, device=d).transpose(1, 2)}, {}, ValueError, "scale"),
    ("q zero missing (int)", "q", "int4:g32:channel", {"zero": lambda b, d: None}, {}, TypeError, "zero"),
    ("q zero too small", "q", "int4:g32:channel", {"zero": lambda b, d: torch.zeros(1, device=d)}, {}, ValueError, "zero"),
    ("q zero given (fp8)", "q", "fp8:head", {"zero": lambda b, d: torch.zeros_like(b["scale"])}, {}, ValueError, "zero"),
    ("q given scale too small (fp8)", "q", "fp8:head", {"scale": lambda b, d: torch.ones(L, device=d)}, {"compute_scale": False}, ValueError, "scale"),
    ("q compute_scale False (int)", "q", "int8:g64:channel", {}, {"compute_scale": False}, ValueError, "compute_scale"),
    ("q x last dim strided", "q", "fp8:tensor", {"x": lambda b, d: torch.randn(L, T, D, H, device=d).transpose(2, 3)}, {}, ValueError, "x"),
    ("q x 3-D", "q", "fp8:tensor", {"x": lambda b, d: b["x"][0]}, {}, ValueError, "x"),
    ("q x int32", "q", "fp8:tensor", {"x": lambda b, d: torch.zeros(L, T, H, D, dtype=torch.int32, device=d)}, {}, TypeError, "x"),
    ("q x empty", "q", "fp8:tensor", {"x": lambda b, d: b["x"][:, :0]}, {}, ValueError, "x"),
    ("q group beyond MAX_GROUP_SIZE", "q", "int4:g1000000:token", {}, {}, ValueError, "group_size"),
    ("q group 2**31", "q", "int4:g2147483648:token", {}, {}, ValueError, "group_size"),
    # ---- dequantize: inputs smaller than out implies, overlapping outputs
    ("dq codes one element", "dq", "int4:g32:channel", {"codes": lambda b, d: torch.zeros(1, dtype=torch.uint8, device=d)}, {}, ValueError, "codes"),
    ("dq codes one element 4-D", "dq", "fp8:token_head", {"codes": lambda b, d: torch.zeros(1, 1, 1, 1, dtype=torch.uint8, device=d)}, {}, ValueError, "codes"),
    ("dq codes one layer short", "dq", "int2:g32:token", {"codes": lambda b, d: b["codes"][:1].contiguous()}, {}, ValueError, "codes"),
    ("dq codes int8 format as fp8", "dq", "int8:g64:channel", {"codes": lambda b, d: b["codes"].view(torch.float8_e4m3fn)}, {}, TypeError, "codes"),
    ("dq scale too small", "dq", "int8:g16:channel", {"scale": lambda b, d: b["scale"][..., :2].contiguous()}, {}, ValueError, "scale"),
    ("dq scale single (broadcast)", "dq", "int4:g32:token", {"scale": lambda b, d: torch.ones(1, device=d)}, {}, ValueError, "scale"),
    ("dq scale 0-D (broadcast)", "dq", "fp8:tensor", {"scale": lambda b, d: torch.ones((), device=d)}, {}, ValueError, "scale"),
    ("dq zero too small", "dq", "int4:g32:token", {"zero": lambda b, d: b["zero"][..., :1].contiguous()}, {}, ValueError, "zero"),
    ("dq zero missing (int)", "dq", "int2:g16:channel", {"zero": lambda b, d: None}, {}, TypeError, "zero"),
    ("dq out expanded over tokens", "dq", "int4:g32:channel", {"out": lambda b, d: _expanded_out(d)}, {}, ValueError, "out"),
    ("dq out expanded (fp8)", "dq", "fp8:head", {"out": lambda b, d: _expanded_out(d)}, {}, ValueError, "out"),
    ("dq out rows overlap", "dq", "int8:g64:channel", {"out": lambda b, d: _overlapping_out(d)}, {}, ValueError, "out"),
    ("dq out last dim strided", "dq", "fp8:token_head", {"out": lambda b, d: torch.zeros(L, T, D, H, dtype=torch.bfloat16, device=d).transpose(2, 3)}, {}, ValueError, "out"),
    ("dq out int32", "dq", "int4:g32:channel", {"out": lambda b, d: torch.zeros(L, T, H, D, dtype=torch.int32, device=d)}, {}, TypeError, "out"),
    ("dq out 3-D", "dq", "int4:g32:channel", {"out": lambda b, d: b["out"][0]}, {}, ValueError, "out"),
    ("dq out head_dim not a multiple of 4 (int2)", "dq", "int2:g2:channel", {"out": lambda b, d: torch.zeros(L, T, H, 6, dtype=torch.bfloat16, device=d)}, {}, ValueError, "out"),
]
if torch.cuda.is_available():
    CASES += [
        ("q scale on the CPU", "q", "fp8:head", {"scale": lambda b, d: b["scale"].cpu()}, {}, ValueError, "scale"),
        ("q codes on the CPU", "q", "int4:g32:channel", {"codes": lambda b, d: b["codes"].cpu()}, {}, ValueError, "codes"),
        ("dq codes on the CPU", "dq", "int4:g32:channel", {"codes": lambda b, d: b["codes"].cpu()}, {}, ValueError, "codes"),
    ]


def _call(op, spec, b, kw, backend, direct):
    """Run one op on buffers ``b``: the registered op, or (``direct``) the CUDA launcher."""
    if direct:
        from kvkernels.cuda import quant as cq

        f = QuantFormat.parse(spec)
        if op == "q":
            return cq.quantize_into(b["x"], f, b["codes"], b["scale"], b["zero"], kw.get("compute_scale", True))
        return cq.dequantize_into(b["codes"], b["scale"], b["zero"], f, b["out"])
    if op == "q":
        return torch.ops.kvkernels.quantize(b["x"], spec, b["codes"], b["scale"], b["zero"],
                                            kw.get("compute_scale", True), backend)
    return torch.ops.kvkernels.dequantize(b["codes"], b["scale"], b["zero"], spec, b["out"], backend)


def _snapshot(b):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else None) for k, v in b.items()}


def _unchanged(b, snap):
    for k, v in b.items():
        if isinstance(v, torch.Tensor) and not torch.equal(v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v,
                                                           snap[k].view(torch.uint8) if v.dtype == torch.float8_e4m3fn else snap[k]):
            return k
    return None


def run_case(case, backend, device, direct=False):
    """None if the case was refused as expected with nothing written, else what went wrong."""
    name, op, spec, repl, kw, exc, word = case
    try:
        b = _bufs(spec, device)
    except ValueError:  # a format that cannot be built (oversized group): any format's buffers
        b = _bufs("int4:g32:token", device)
    for k, fn in repl.items():
        b[k] = fn(b, device)
    snap = _snapshot(b)
    try:
        _call(op, spec, b, kw, backend, direct)
    except (ValueError, TypeError) as e:
        msg = str(e)
        if type(e) is not exc and not isinstance(e, exc):
            return f"raised {type(e).__name__} (expected {exc.__name__}): {msg}"
        if not msg.startswith(word) and f"{word}:" not in msg:
            return f"message does not name {word!r}: {msg}"
        if device == "cuda":
            torch.cuda.synchronize()
        changed = _unchanged(b, snap)
        return f"{changed} was written before the refusal" if changed else None
    except Exception as e:  # noqa: BLE001 (anything else is a failure of the case)
        return f"raised {type(e).__name__}, not ValueError/TypeError: {e}"
    if device == "cuda":
        torch.cuda.synchronize()
    return "accepted (no error)"


def run_controls(backend, device):
    """One well-formed quantize + dequantize per format family: must match the reference."""
    fails = []
    for spec in ("int4:g32:channel", "int2:g4:token", "fp8:head"):
        b = _bufs(spec, device)
        r = _bufs(spec, device)
        r["x"] = b["x"]
        try:
            _call("q", spec, b, {}, backend, False)
            _call("q", spec, r, {}, "torch", False)
            if not torch.equal(b["scale"], r["scale"]):
                fails.append(f"control {spec}: scales differ from the reference")
            _call("dq", spec, r, {}, backend, False)
            want = r["out"].clone()
            _call("dq", spec, r, {}, "torch", False)
            if (want.float() - r["out"].float()).abs().max().item() > 2.0**-7 * r["out"].float().abs().max().item():
                fails.append(f"control {spec}: dequantized values differ from the reference")
        except Exception as e:  # noqa: BLE001
            fails.append(f"control {spec}: {type(e).__name__}: {e}")
    if device == "cuda":
        torch.cuda.synchronize()
    return fails


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="cuda", choices=("cuda", "triton", "torch"))
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--no-controls", action="store_true", help="skip the well-formed calls")
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.backend == "cuda" and device != "cuda":
        print("the cuda backend needs a GPU", file=sys.stderr)
        return 2
    failures = []
    n = 0
    for case in CASES:
        for direct in ((False, True) if args.backend == "cuda" else (False,)):
            label = f"{case[0]}{' [launcher]' if direct else ''}"
            print(f"case: {label}", flush=True)
            why = run_case(case, args.backend, device, direct)
            n += 1
            if why:
                failures.append(f"{label}: {why}")
                print(f"  FAIL {why}", flush=True)
    if not args.no_controls:
        print("controls", flush=True)
        failures += run_controls(args.backend, device)
    print(json.dumps({"backend": args.backend, "device": device, "cases": n, "failures": failures}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
