"""kvkernels: GPU kernels for delivering knowledge to LLMs as KV caches."""
