"""Compile the Gluon kernels of kvkernels/triton_kernels/quant_gluon.py for sm_90 without a GPU and
print one JSON line of [{kernel, config, cubin bytes, shared bytes}]. Run by
test_gluon_kernels_compile_sm90 in a process without TRITON_INTERPRET."""
import json

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

from kvkernels.formats import QuantFormat
from kvkernels.triton_kernels import quant_gluon as tq

TARGET = GPUTarget("cuda", 90, 32)
WORDS = {1: "*u8", 2: "*i16", 4: "*i32", 8: "*i64"}
OUT = {2: "*bf16", 4: "*fp32"}


def compile_fn(fn, consts, types, warps, **opts):
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    # pointers 16-byte aligned, as the launchers require (Triton specializes on it at run time)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if sig[n].startswith("*")}
    k = triton.compile(GluonASTSource(fn, sig, constexprs=consts, attrs=attrs), target=TARGET,
                       options=dict(num_warps=warps, enable_fp_fusion=False, **opts))
    return len(k.asm["cubin"]), k.metadata.shared


def dq_token(spec, H, D, esize):
    fmt = QuantFormat.parse(spec)
    _, consts, warps = tq._dq_token_gluon_params(H, D, esize, fmt.group_size, fmt.bits)
    consts.update(OS=0, CS=0, MASKED=True)
    types = dict(codes_ptr=WORDS[consts["V"] * fmt.bits // 8], scale_ptr="*fp32", zero_ptr="*fp32",
                 out_ptr=OUT[esize], s_l="i64", s_t="i64", s_h="i64")
    cubin, shared = compile_fn(tq._dq_int_token_gl, consts, types, warps)
    return dict(kernel="dq_token", spec=spec, H=H, D=D, esize=esize, cubin=cubin, shared=shared)


def fp8_resident(esize, K, HS, D, NW):
    consts = dict(VE=16 // esize, K=K, HS=HS, D=D, NW=NW, GP2=128, tr_ptr=None, TRACE=False)
    types = dict(x_ptr=OUT[esize], codes_ptr="*u8", scale_ptr="*fp32", slots_ptr="*i32", s_lv="i64", Nlv="i64")
    cubin, shared = compile_fn(tq._q_fp8_resident_gl, consts, types, NW, maxnreg=64)
    return dict(kernel="fp8_resident", esize=esize, K=K, HS=HS, D=D, NW=NW, cubin=cubin, shared=shared)


if __name__ == "__main__":
    rows = [dq_token(*c) for c in [("int2:g32:token", 8, 128, 2), ("int4:g32:token", 3, 80, 2),
                                   ("int8:g32:token", 8, 128, 2), ("int8:g48:token", 5, 96, 4),
                                   ("int2:g4:token", 3, 64, 2)]]
    rows += [fp8_resident(*c) for c in [(2, 4, 1, 128, 32), (2, 1, 8, 128, 16), (4, 2, 3, 64, 8)]]
    print(json.dumps(rows))
