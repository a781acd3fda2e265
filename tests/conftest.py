"""Test set-up: on a machine without a GPU, Triton kernels run in the interpreter on CPU tensors.

TRITON_INTERPRET must be set before any Triton kernel is imported, so it is set here.
"""
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed(request):
    # A fresh but reproducible seed per test (crc32 of its id: str hash() changes per process),
    # so a failure replays with the same inputs.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
