"""Device facts the backends' launch choices depend on (cached per device)."""
from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def l2_bytes(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).L2_cache_size)


def fp8_one_pass(x: torch.Tensor) -> bool:
    """Whether fp8 tensor/head quantize with computed scales should run as one launch that reads
    each layer of ``x`` ([L, T, H, D]) from HBM once and again from L2 (the quantize tiles of a
    layer run while the next layer's amax tiles stream in, so about two layers must stay in L2),
    rather than an amax pass and a quantize pass over HBM. ``KVKERNELS_FP8_ONE_PASS=0/1``
    forces it; on CPU (the Triton interpreter) it is always on."""
    force = os.environ.get("KVKERNELS_FP8_ONE_PASS")
    if force in ("0", "1"):
        return force == "1"
    if x.device.type != "cuda":
        return True
    layer = x[0].numel() * x.element_size()
    return 3 * layer <= l2_bytes(x.device.index if x.device.index is not None else torch.cuda.current_device())
