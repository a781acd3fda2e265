"""Bits per element and relative L2 error of the codec presets on KV-like random data of a model
without a bundled step profile (Llama-3-8B shape, 512 tokens): what the ``default`` preset falls
back to there. The numbers are recorded in docs/codec-quality.md ("Models without a profile").

    PYTHONPATH=. python experiments/codec_quality/fallback_bits.py
"""
import torch

import kvkernels.codec as C

torch.manual_seed(0)
shape = (2, 32, 512, 8, 128)  # [2, L, T, H, D]
x = (torch.randn(shape) * (0.5 + torch.rand(shape[-1])) + torch.randn(shape[-1]) * 0.3).to(torch.bfloat16)
print("| preset | bits/element | rel. L2 error |\n|---|---:|---:|")
for p in ("default", "affine_v1", "cachegen"):
    b = C.encode(x, p)
    y = C.decode(b).float()
    err = float((y - x.float()).norm() / x.float().norm())
    print(f"| {p} | {len(b) * 8 / x.numel():.3f} | {err:.4f} |")
