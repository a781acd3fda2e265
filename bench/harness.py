"""Shared bench harness: timing (events after warm-up, L2 flushed), the copy baseline, rows.

Every row reports bandwidth from an explicit bytes-read-plus-written formula and its ratio to a
device-to-device copy of the same number of bytes, measured in the same run.
"""
from __future__ import annotations

import datetime
import platform
import statistics
import time
from typing import Callable, Dict, List

import torch


def env_info(device: str) -> Dict[str, str]:
    info = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = "none"
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, cuda=str(torch.version.cuda), sms=str(p.multi_processor_count))
    else:
        info.update(gpu="none (CPU: " + (platform.processor() or platform.machine()) + ")", cuda="none")
    return info


class Timer:
    """Median time of ``fn`` in microseconds; on CUDA with events, the L2 flushed before each rep."""

    def __init__(self, device: str, warmup: int = 5, reps: int = 30):
        self.device, self.warmup, self.reps = device, warmup, reps
        if device == "cuda":
            l2 = torch.cuda.get_device_properties(0).L2_cache_size
            self.flush = torch.empty(max(2 * l2, 64 << 20), dtype=torch.uint8, device="cuda")

    def __call__(self, fn: Callable[[], object]) -> Dict[str, float]:
        for _ in range(self.warmup):
            fn()
        times: List[float] = []
        if self.device == "cuda":
            torch.cuda.synchronize()
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(self.reps)]
            for s, e in ev:
                self.flush.zero_()
                s.record()
                fn()
                e.record()
            torch.cuda.synchronize()
            times = [s.elapsed_time(e) * 1e3 for s, e in ev]
        else:
            for _ in range(self.reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e6)
        q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
        return {"median_us": statistics.median(times), "p10_us": q[0], "p90_us": q[-1]}


class CopyBaseline:
    """Device-to-device copy time of N bytes (N read + N written), measured once per size."""

    def __init__(self, timer: Timer):
        self.timer, self.cache = timer, {}

    def gbps(self, nbytes_moved: int) -> float:
        n = max(nbytes_moved // 2, 1)
        if n not in self.cache:
            src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=self.timer.device)
            dst = torch.empty_like(src)
            t = self.timer(lambda: dst.copy_(src))["median_us"]
            self.cache[n] = 2 * n / t / 1e3
            del src, dst
        return self.cache[n]
