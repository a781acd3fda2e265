"""Triton backend of the entropy coders: none (``supports`` refuses every case).

Entropy coding is sequential within a lane (each symbol's state depends on the previous one and
rANS lanes share one word stream through warp ballots / prefix counts); Triton has no warp-level
ballot or lane-dependent sequential loop that would make this efficient, so the coders are CUDA
C++ only (csrc/codec_ac.cuh, csrc/codec_rans.cuh, csrc/codec.cu) with the torch reference and the
C++ CPU coder as the CPU path.
"""
from __future__ import annotations

from typing import Optional

_WHY = ("entropy coders are sequential per lane (state-dependent symbol loop, warp-ballot word "
        "streams): implemented in CUDA C++ only")


def supports(*args, **kwargs) -> Optional[str]:
    return _WHY


def _refuse(*args, **kwargs):
    raise NotImplementedError(_WHY)


ac_encode_into = ac_decode_into = rans_encode_into = rans_decode_into = rans_decode_dequant_into = _refuse
