// quant_all.cuh -- the library's quant kernels and launchers as one translation unit, for the
// harnesses here that reach internal kernels (quant_fp8_resident_kernel, ld_relaxed_gpu, the token
// kernels) or build with developer macros (KVK_FP8_TRACE): #include this, then exp_common.cuh.
#include "../csrc/quant_rows.cu"
#include "../csrc/quant_token.cu"
#include "../csrc/quant_fp8.cu"
#include "../csrc/quant_fp8_onepass.cu"
#include "../csrc/quant.cu"
