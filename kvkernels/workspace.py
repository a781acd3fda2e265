"""Scratch memory that kernels keep from one launch to the next.

``fp8_slots(device, words)``: the int64 workspace of the one-pass fp8 kernels (fp8 tensor / head
scopes with computed scales: ``quant_fp8_resident_kernel`` in csrc/quant.cu and
``_q_fp8_resident_gl`` in kvkernels/triton_kernels/quant.py). Layout, shared by both kernels:

* word 0: the epoch ``E`` (low 32 bits) and a done counter (high 32 bits);
* words 1-7: unused (the slots start on their own 64-byte line);
* words 8 on: slots, each ``(tag << 32) | amax bits``.

A launch tags its slots ``T = E + 1`` (0 skipped), so slots written by earlier launches read as
empty and nothing is cleared between launches (clearing cost 2-3 us a launch: a grid barrier in
the CUDA kernel, a memset kernel before the Gluon one). The last program to finish advances
``E``. The state is valid only between launches that run one after another, so there is one
workspace per (device, stream); it is zeroed when created or grown.

During CUDA-graph capture each call gets a fresh zeroed workspace from the graph's pool (a
memset node in the graph), so graphs replayed on different streams never share one.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

HEADER_WORDS = 8

_FP8: Dict[Tuple[int, int], torch.Tensor] = {}


def fp8_slots(device: torch.device, words: int) -> torch.Tensor:
    """A zero-initialised-once int64 tensor of at least ``HEADER_WORDS + words`` elements on
    ``device`` for torch's current stream there (see the module docstring)."""
    need = HEADER_WORDS + int(words)
    if torch.cuda.is_current_stream_capturing():
        return torch.zeros(need, dtype=torch.int64, device=device)
    key = (device.index if device.index is not None else torch.cuda.current_device(),
           torch.cuda.current_stream(device).cuda_stream)
    ws = _FP8.get(key)
    if ws is None or ws.numel() < need:
        # grown by doubling: a new buffer starts a new epoch (E = 0, every slot empty); the old
        # one is freed behind this stream's queued work (the caching allocator's stream order)
        ws = torch.zeros(max(need, 2 * (0 if ws is None else ws.numel())), dtype=torch.int64, device=device)
        _FP8[key] = ws
    return ws
