"""Compile the paged Triton kernels for sm_90 without a GPU (run by test_triton_kernels_compile_sm90
in a process without TRITON_INTERPRET) and print one JSON line of [{kernel, ..., v4}]: the count
of 128-bit vector accesses in the PTX, with the run-time specializations a real launch gets
(dense inner stride 1, 16-divisible strides and pointers)."""
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvkernels.triton_kernels import paged as tp

TARGET = GPUTarget("cuda", 90, 32)
def compile_fn(fn, consts, types, warps):
    ones = {"kDI": 1, "vDI": 1, "kDX": 0, "vDX": 0}
    consts = {**consts, **{k: v for k, v in ones.items() if k in fn.arg_names}}
    sig = {n: "constexpr" if n in consts else types.get(n, "i64") for n in fn.arg_names}
    small = ("T", "L", "H", "NSLOTS", "BS", "X")
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if sig[n] != "constexpr" and n not in small}
    k = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=TARGET,
                       options=dict(num_warps=warps, enable_fp_fusion=False))
    return k


def r1_reads(k):
    """SASS lines reading R1 (the stack pointer, set by ``LDC R1, c[0x0][0x28]``) as data: Triton
    3.6's ptxas did so for int4 -> fp8 packed words (garbage 0xFC cache bytes on the H100); None
    without nvdisasm."""
    nvd = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    if not os.path.exists(nvd) or "cubin" not in k.asm:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        p = subprocess.run([nvd, "-c", f.name], capture_output=True, text=True)
    if p.returncode:
        return None
    return sum(1 for l in p.stdout.splitlines() if re.search(r"\bR1\b", l) and "c[0x0][0x28]" not in l)


rows = []
for SRC, BITS, CDT, ALIGN, SPLIT in [(0, 8, 2, True, False), (0, 8, 3, True, False), (1, 4, 2, True, False), (2, 8, 0, False, True)]:
    consts = dict(D=128, DP=128, HP=8, TB=4, SRC=SRC, BITS=BITS, TG=1, DG=32, CDT=CDT, SPLIT=SPLIT, COUNT=True, CLAMP=False, ALIGN=ALIGN, SAME_KV=True, FULL_H=True)
    types = dict(src_ptr="*bf16" if SRC == 0 else "*u8", scale_ptr="*fp32", zero_ptr="*fp32", ptrs_ptr="*i64", slots_ptr="*i64",
                 ks_ptr="*fp32", vs_ptr="*fp32", cnt_ptr="*i32")
    k = compile_fn(tp._scatter_kernel, consts, types, 4)
    ptx = k.asm["ptx"]
    rows.append(dict(kernel="scatter", SRC=SRC, CDT=CDT, ALIGN=ALIGN, v4=ptx.count(".v4"), v2=ptx.count(".v2"), r1=r1_reads(k)))
for DST, BITS, G, CDT, ALIGN in [(0, 8, 1, 2, True), (0, 8, 1, 3, True), (1, 4, 32, 2, True), (2, 8, 1, 2, True)]:
    consts = dict(D=128, DP=128, HP=8, TB=4, DST=DST, BITS=BITS, G=G, CDT=CDT, SPLIT=False, COUNT=False, CLAMP=False, ALIGN=ALIGN, SAME_KV=True, FULL_H=True)
    types = dict(out_ptr="*bf16" if DST == 0 else "*u8", codes_ptr="*u8", scale_ptr="*fp32", zero_ptr="*fp32", ptrs_ptr="*i64",
                 slots_ptr="*i32", ks_ptr="*fp32", vs_ptr="*fp32", cnt_ptr="*i64")
    k = compile_fn(tp._gather_kernel, consts, types, 4)
    ptx = k.asm["ptx"]
    rows.append(dict(kernel="gather", DST=DST, CDT=CDT, v4=ptx.count(".v4"), v2=ptx.count(".v2"), r1=r1_reads(k)))
for SRC, BITS, G, NG, GBP, PACK in [(1, 8, 64, 2, 64, False), (1, 4, 32, 4, 16, False), (2, 8, 128, 1, 128, False),
                                    (1, 4, 32, 4, 16, True)]:
    CV = min(GBP, 16 // 2 // (8 // BITS))  # a bf16 cache
    TB = max(1, min(4096 // (8 * NG * G), tp._DQ_ROWS // (8 * NG)))
    consts = dict(HP=8, TB=TB, NG=NG, NGP=NG, G=G, GBP=GBP, SRC=SRC, BITS=BITS, TG=1, CV=CV, CDT=2,
                  SPLIT=False, COUNT=False, CLAMP=False, ALIGN=True, SAME_KV=True, PACK=PACK)
    types = dict(src_ptr="*u8", scale_ptr="*fp32", zero_ptr="*fp32", ptrs_ptr="*i64", slots_ptr="*i64",
                 ks_ptr="*fp32", vs_ptr="*fp32", cnt_ptr="*i32")
    k = compile_fn(tp._dequant_scatter_kernel, consts, types, 4)
    ptx = k.asm["ptx"]
    rows.append(dict(kernel="dequant_scatter", SRC=SRC, BITS=BITS, PACK=PACK, v4=ptx.count(".v4"), v2=ptx.count(".v2"),
                     ld=ptx.count("ld.global"), st=ptx.count("st.global"), shared=k.metadata.shared, r1=r1_reads(k)))
# int codes into fp8 caches (the variants scatter_into launches; packed words are routed to the
# element-wise kernel, see _ptxas_bad_pack): no R1 reads in the SASS
for BITS, G, NG, GBP in [(4, 32, 4, 16), (8, 64, 2, 64)]:
    CV = min(GBP, 16 // (8 // BITS))
    TB = max(1, min(4096 // (2 * NG * G), tp._DQ_ROWS // (2 * NG)))
    consts = dict(HP=2, TB=TB, NG=NG, NGP=NG, G=G, GBP=GBP, SRC=1, BITS=BITS, TG=1, CV=CV, CDT=3,
                  SPLIT=False, COUNT=False, CLAMP=False, ALIGN=True, SAME_KV=True, PACK=False)
    types = dict(src_ptr="*u8", scale_ptr="*fp32", zero_ptr="*fp32", ptrs_ptr="*i64", slots_ptr="*i64",
                 ks_ptr="*fp32", vs_ptr="*fp32", cnt_ptr="*i32")
    k = compile_fn(tp._dequant_scatter_kernel, consts, types, 4)
    rows.append(dict(kernel="dequant_scatter_fp8", BITS=BITS, PACK=False, r1=r1_reads(k)))
for BITS, G in [(4, 32), (2, 16)]:
    consts = dict(D=128, DP=128, HP=2, TB=16, SRC=1, BITS=BITS, TG=1, DG=G, CDT=3, SPLIT=False, COUNT=False, CLAMP=False,
                  ALIGN=True, SAME_KV=True, FULL_H=True)
    types = dict(src_ptr="*u8", scale_ptr="*fp32", zero_ptr="*fp32", ptrs_ptr="*i64", slots_ptr="*i64",
                 ks_ptr="*fp32", vs_ptr="*fp32", cnt_ptr="*i32")
    k = compile_fn(tp._scatter_kernel, consts, types, 4)
    rows.append(dict(kernel="scatter_fp8", BITS=BITS, r1=r1_reads(k)))
print(json.dumps(rows))
