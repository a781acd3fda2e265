"""Registers and SASS size of the Triton token-group quantize kernel, compiled for sm_90 without
a GPU (Triton's own ptxas; cuobjdump from Triton's nvidia backend must be on PATH).

    PATH=$(python -c "import triton,os;print(os.path.dirname(triton.__file__))")/backends/nvidia/bin:$PATH \\
    PYTHONPATH=. python experiments/triton_regs.py [--module OLD_quant.py] [--dequantize]

``--dequantize``: the token-group dequantize kernel instead, at CONFIG's tile and two others:
registers, shared memory and the shared-memory traffic and barriers of its layout changes.

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
from triton_tune import load_module  # noqa: E402  (experiments/ is on sys.path when run as a script)

TYPES = dict(x_ptr="*bf16", out_ptr="*bf16", codes_ptr="*u8", scale_ptr="*fp32", zero_ptr="*fp32",
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
    shared = int(re.search(r"SHARED:(\d+)", res).group(1))
    ops = re.findall(r"^\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass, re.M)
    kinds = {k: sum(1 for o in ops if o.startswith(k))
             for k in ("F2I", "FADD.FTZ.RM", "FMNMX", "VHMNMX", "HMNMX2", "LDG", "STG", "LDS", "STS", "BAR")}
    kinds["shared_bytes"] = shared
    return regs, len(ops), kinds


def dequantize_report(mod, T, H, D, L, G) -> None:
    """_dq_int_token at the launch dequantize_into uses, and two other (TB, HB, warps) tiles."""
    cfg = mod.CONFIG["dq_token"]
    for bits in (4, 2):
        K = 8 // bits
        TB = min(G, mod._pow2_floor(max(1, cfg["elems"] // D)))
        HB = min(mod._p2(H), mod._pow2_floor(max(1, cfg["elems"] // (TB * D))))
        OS, CS = mod._token_strides(H * D, 2, G, H, D, K)
        for tb, hb, nw in ((TB, HB, cfg["warps"]), (TB, max(1, HB // 2), cfg["warps"]), (TB, HB, 2 * cfg["warps"])):
            consts = dict(D=D, DP=D, G=G, TB=tb, HB=hb, BITS=bits, CV=max(1, 8 // K), OS=OS, CS=CS, PART=False)
            regs, n, kinds = compile_info(mod._dq_int_token, consts, nw)
            ops = " ".join(f"{k}={kinds[k]}" for k in ("LDG", "STG", "LDS", "STS", "BAR", "shared_bytes"))
            print(f"int{bits}:g32:token dequantize TB={tb} HB={hb} warps={nw}  {regs:4d} registers "
                  f"{n:5d} SASS instructions ({ops})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--module", default="", help="another quant.py (e.g. an older version)")
    p.add_argument("--dequantize", action="store_true", help="the token-group dequantize kernel instead")
    args = p.parse_args()
    if args.module:
        mod = load_module(args.module)
    else:
        from kvkernels.triton_kernels import quant as mod
    T, H, D, L, G = 4096, 8, 128, 32, 32
    print(f"# triton {triton.__version__}, sm_90, bf16 [{L}, {T}, {H}, {D}], {args.module or 'committed module'}")
    if args.dequantize:
        dequantize_report(mod, T, H, D, L, G)
        return 0
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
