"""``python -m kvkernels``: versions, the GPU, and which backends can run here (and why not)."""
import platform
import sys

import torch

import kvkernels
from kvkernels import dispatch


def main() -> int:
    print(f"kvkernels {kvkernels.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except Exception as e:  # pragma: no cover - depends on the machine
        print(f"triton: not importable ({e})")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"GPU: {p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
              f"{p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}")
    else:
        print("GPU: none visible to torch")
    try:
        from kvkernels import _C

        print(f"extension kvkernels._C: built (CUDA runtime {_C.cuda_version()})")
    except Exception as e:
        print(f"extension kvkernels._C: not built ({e})")
    print("backends (priority order):")
    for name, why in dispatch.backend_report().items():
        print(f"  {name:7s} {'available' if why is None else 'unavailable: ' + why}")
    print("ops: " + ", ".join(f"{op} [{', '.join(dispatch.backends_of(op))}]" for op in dispatch.ops()))
    for op, (order, why) in sorted(dispatch.preferences().items()):
        print(f"  {op}: tried in the order {', '.join(order)} ({why})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
