"""Registers and SASS size of the Triton token-group quantize kernel, compiled for sm_90 without
a GPU (Triton's own ptxas; cuobjdump from Triton's nvidia backend must be on PATH).

    PATH=$(python -c "import triton,os;print(os.path.dirname(triton.__file__))")/backends/nvidia/bin:$PATH \\
    PYTHONPATH=. python scripts/triton_regs.py [--module OLD_quant.py]

For bf16 Llama-3-8B K ([32, 4096, 8, 128]) and int4/int2 g32 token groups with the launch that
``quantize_into`` would use: the kernel's register count per variant (the committed module: full
groups with and without the packed min/max, and the partial-group launch; ``--module`` with a
version from before the split: the one kernel holding both branches), its SASS instruction
count, and how many float-to-int conversions (F2I), round-down adds (FADD.FTZ.RM) and float /
packed 16-bit min/max instructions it has (per thread: 128 elements). Private tool: the numbers
back docs/perf-notes.md; a GPU run decides what is kept.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from triton_tune import load_module  # noqa: E402  (scripts/ is on sys.path when run as a script)

TYPES = dict(x_ptr="*bf16", codes_ptr="*u8", scale_ptr="*fp32", zero_ptr="*fp32",
             s_l="i64", s_t="i64", s_h="i64")


def compile_info(fn, consts, num_warps):
    """(registers, SASS instructions, {opcode: count} for the conversions and min/max) of fn
    compiled for sm_90 with the given constexprs."""
    sig = {n: ("constexpr" if n in consts else TYPES.get(n, "i32")) for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n].startswith("*") or n in ("s_l", "s_t", "s_h", "T")}
    k = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=num_warps, enable_fp_fusion=False))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        res = subprocess.run(["cuobjdump", "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run(["cuobjdump", "-sass", f.name], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", res).group(1))
    ops = re.findall(r"^\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass, re.M)
    kinds = {k: sum(1 for o in ops if o.startswith(k)) for k in ("F2I", "FADD.FTZ.RM", "FMNMX", "VHMNMX", "HMNMX2")}
    return regs, len(ops), kinds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--module", default="", help="another quant.py (e.g. an older version)")
    args = p.parse_args()
    if args.module:
        mod = load_module(args.module)
    else:
        from kvkernels.triton_kernels import quant as mod
    T, H, D, L, G = 4096, 8, 128, 32, 32
    print(f"# triton {triton.__version__}, sm_90, bf16 [{L}, {T}, {H}, {D}], {args.module or 'committed module'}")
    for bits in (4, 2):
        K = 8 // bits
        _, DC, TA, TL, HB, VX, nw = mod._q_token_launch(T, H, D, L, G, K, 2, mod.CONFIG["q_token"])
        XS, CS = mod._token_strides(H * D, 2, G, H, D, K)
        base = dict(D=D, DC=DC, G=G, TA=TA, TL=TL, HB=HB, BITS=bits, VX=VX, XS=XS, CS=CS)
        params = mod._q_int_token.arg_names
        if "PART" in params:
            variants = [("full groups, packed min/max", dict(PAIRS=True, PART=False)),
                        ("full groups, float min/max", dict(PAIRS=False, PART=False)),
                        ("partial last group", dict(PAIRS=False, PART=True))]
        else:
            variants = [("one kernel, both branches", {})]
        for name, extra in variants:
            regs, n, kinds = compile_info(mod._q_int_token, dict(base, **extra), nw)
            ops = " ".join(f"{k}={v}" for k, v in kinds.items())
            print(f"int{bits}:g32:token TA={TA} TL={TL} HB={HB} warps={nw}  {name:28s} {regs:4d} registers "
                  f"{n:5d} SASS instructions ({ops})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
