"""The one tolerance table for numerics (value = allowed |a - b| / max|ref| unless noted).

Basis: a dequantized value is ``q * scale + zero`` in float32 rounded once to the output dtype;
two correct implementations differ by float32 rounding (FMA or not: ~2**-23 relative to the
group's magnitude) plus one rounding of the output dtype, i.e. at most one ulp of the output
dtype at the tensor's largest magnitude. The Triton interpreter truncates fp32 -> bf16 instead of
rounding, which is also within one ulp.
"""
import torch

# one ulp at magnitude 1 of each output dtype (= 2 * unit roundoff), relative to max|ref|
OUT_ULP = {torch.float32: 2.0**-22, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}

# int codes: |x_hat - x| <= scale / 2 exactly in real arithmetic; float32 evaluation of
# (x - mn) / scale and the float64 decode add a few ulps of float32 relative to the group range.
INT_STEP_SLACK = 1e-5  # relative to the group's (mx - mn)

# fp8 e4m3: 3 mantissa bits -> half-ulp relative error 2**-4 for normals; below the smallest
# normal (2**-6 * scale) the absolute error is at most half the subnormal step 2**-10 * scale.
# On top of either, the float32 product x * inv (inv = RN(1/scale)) is off from x / scale by up
# to two float32 roundings: FP8_PRODUCT_REL * |x|, added in both regimes.
FP8_REL = 2.0**-4
FP8_PRODUCT_REL = 2.0**-22
FP8_SUBNORMAL_ABS = 2.0**-10  # times scale

# rerotate_keys: the rotation by (new - old) composed in float32 from two cache rows (a few float32
# roundings, |cos_d|, |sin_d| <= 1 + 2**-22) and applied to a pair in float32: <= 8 float32 ulps of
# the pair's magnitude, plus one rounding of the key's dtype (relative to max|ref|).
ROT_F32_REL = 8 * 2.0**-24
# fp8 keys: one e4m3 rounding of the rotated value (half-ulp 2**-4 relative, subnormals as above).
# select_tokens deviation: a float32 sum of H*D squares; reduction order differs between backends.
DEV_REL = 1e-5
