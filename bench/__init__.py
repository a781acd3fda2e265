"""kvkernels bench CLI: ``python -m bench <case> [options]`` (see ``python -m bench --help``).

Buffers come from torch's allocator with expandable segments (set here, before torch touches the
GPU, unless PYTORCH_CUDA_ALLOC_CONF is already set; rows record the setting). Without them, on
an H200, a dequantize whose output was carved from a cached block that had held the reference
check's large float temporaries ran at 84-86% of copy, and at 93-96% in a fresh block or with
expandable segments, on both backends (scripts/diag_writes.py, docs/perf-notes.md).
"""
import os

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
