"""Shared bench harness: timing (events after warm-up, L2 flushed), the copy baseline, rows.

Every row reports bandwidth from an explicit bytes-read-plus-written formula and its ratio to a
device-to-device copy of the same number of bytes, measured in the same run.
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import time
from typing import Callable, Dict, List

import torch


CPU_NOTE = ("CPU run: each row checks a backend against the torch reference and times it on the host; "
            "no % of copy is computed (nan): a CPU memcpy is not a ceiling for the reference, whose "
            "inputs stay in caches, so its ratios (500%+) mean nothing. Speed figures: GPU runs only.")


def is_meaningful_pct(v) -> bool:
    """Whether a row's % of copy was measured (False for CPU runs: nan)."""
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def env_info(device: str) -> Dict[str, str]:
    info = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version(),
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}
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
    """Median time of ``fn`` in microseconds; on CUDA with events around a graph replay of ``fn``
    (eager if it cannot be captured), the L2 flushed before each rep."""

    def __init__(self, device: str, warmup: int = 5, reps: int = 30):
        self.device, self.warmup, self.reps = device, warmup, reps
        if device == "cuda":
            # The flush READS 2x the L2 size: it leaves the L2 full of clean lines. (Zero-filling a
            # buffer instead left ~L2-size dirty lines whose write-back landed inside the next
            # timed region: measured +12 us on 400 MiB cases on an H200, unless host overhead
            # before the kernel happened to leave time for it.)
            l2 = torch.cuda.get_device_properties(0).L2_cache_size
            self.flush = torch.ones(max(2 * l2, 64 << 20) // 4, dtype=torch.int32, device="cuda")
            self.sink = torch.zeros((), dtype=torch.int64, device="cuda")

    def __call__(self, fn: Callable[[], object], graph: bool = True) -> Dict[str, float]:
        for _ in range(self.warmup):
            fn()
        times: List[float] = []
        if self.device == "cuda":
            # Time a CUDA-graph replay of fn when it can be captured (the ops are capturable): the
            # Python dispatch of an eager call can outlast the L2 flush before it and would put
            # host time between the events for small sizes. Eager otherwise.
            g = self._graph(fn) if graph else None
            step = g.replay if g is not None else fn
            torch.cuda.synchronize()
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(self.reps)]
            for s, e in ev:
                torch.sum(self.flush, dim=0, out=self.sink)
                s.record()
                step()
                e.record()
            torch.cuda.synchronize()
            times = [s.elapsed_time(e) * 1e3 for s, e in ev]
            if g is not None:  # release the graph's memory pool now, not when a later gc finds it
                del step
                g.reset()
                del g
        else:
            for _ in range(self.reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e6)
        q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
        return {"median_us": statistics.median(times), "p10_us": q[0], "p90_us": q[-1]}


    @staticmethod
    def _graph(fn: Callable[[], object]):
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            torch.cuda.synchronize()
            return g
        except Exception:  # not capturable: time eager calls
            torch.cuda.synchronize()
            return None


class CopyBaseline:
    """Device-to-device copy rate for N bytes (N/2 read + N/2 written), measured once per size.

    Timed eagerly: captured into a graph, torch's copy becomes a memcpy node that ran at 2.8
    instead of 4.1 TB/s on an H200 at 3 GiB; one eager call has little host overhead next to the
    L2 flush before it. The rate is the best of three buffer placements: single placements gave
    3.8 TB/s for 1.3-1.4 GiB copies and 4.3 TB/s for 1.5-1.6 GiB on an H200, so one placement can
    understate the device's copy rate by ~10% (the per-placement rates are kept in ``detail``).
    """

    def __init__(self, timer: Timer):
        self.timer, self.cache, self.detail = timer, {}, {}

    def gbps(self, nbytes_moved: int) -> float:
        """Copy rate in GB/s; nan off CUDA (see ``CPU_NOTE``: no meaningful ceiling there)."""
        if self.timer.device != "cuda":
            return float("nan")
        n = max(nbytes_moved // 2, 1)
        if n not in self.cache:
            rates = []
            for shift in (0, 3 << 20, 37 << 20):
                buf = torch.randint(0, 255, (2 * n + shift + 4096,), dtype=torch.uint8, device=self.timer.device)
                src, dst = buf[:n], buf[n + shift + 4096:2 * n + shift + 4096]
                t = self.timer(lambda: dst.copy_(src), graph=False)["median_us"]
                rates.append(2 * n / t / 1e3)
                del buf, src, dst
            self.cache[n], self.detail[n] = max(rates), rates
        return self.cache[n]
