"""Private experiment (fourteenth session): per-program %globaltimer trace of the Gluon one-pass
fp8 kernel (_q_fp8_resident_gl with TRACE=True), the counterpart of experiments/fp8_trace_exp.cu
for the CUDA kernel, with the same statistics: per step the median over programs of four points
(landed, published, scale known, quantized; ns from the first landing), the kernel's ends, and
the mean per program-iteration of each phase. Also the launch as the library makes it (slots
zeroed by torch.zeros, then the kernel) timed with the trace off (median of 20, no L2 flush):
eager launches from Python, so that time is dominated by the launch overhead; compare the
traced spans, not it.

    PYTHONPATH=$PWD python3 experiments/gluon_trace_exp.py
"""
import statistics

import torch

from kvkernels.formats import QuantFormat
from kvkernels.triton_kernels import quant as tq


def median(v):
    return statistics.median(v) if v else 0.0


def run(name, L, T, H, D, scope):
    torch.manual_seed(0)
    x = torch.randn(L, T, H, D, device="cuda", dtype=torch.bfloat16)
    fmt = QuantFormat.parse(f"fp8:{scope}")
    codes = torch.empty(L, T, H, D, device="cuda", dtype=torch.uint8)
    nscale = L * (H if scope == "head" else 1)
    scale = torch.empty(nscale, device="cuda", dtype=torch.float32)
    plan = tq._fp8_resident_plan(x, codes, fmt)
    assert plan is not None, "the one-pass kernel does not apply"
    for _ in range(5):
        tq._q_fp8_resident_launch(x, codes, scale, plan)
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(20):
        e0.record()
        tq._q_fp8_resident_launch(x, codes, scale, plan)
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) * 1e3)
    gpb, ng, nw = plan["gpb"], plan["NG"], plan["warps"]
    grid = ng * gpb
    tr = torch.zeros(grid * 65 * 4, device="cuda", dtype=torch.int64)
    slots = torch.zeros(plan["nL"] * gpb, dtype=torch.int32, device=x.device)
    tq._q_fp8_resident_gl[(grid,)](
        x, codes, scale, slots, plan["s_lv"], plan["Nlv"], plan["Nv"], plan["nL"], plan["nsteps"], ng, gpb,
        VE=plan["VE"], K=plan["K"], HS=plan["HS"], D=plan["D"], NW=nw, GP2=tq._p2(gpb), tr_ptr=tr, TRACE=True,
        num_warps=nw, maxnreg=64, launch_cooperative_grid=True, **tq._LAUNCH)
    torch.cuda.synchronize()
    h = tr.view(grid, 65, 4).cpu().tolist()
    nsteps = min(plan["nsteps"], 64)
    # programs with a layer in every step (the last step may leave some groups without one)
    full = [b for b in range(grid) if all(h[b][s][0] for s in range(nsteps))]
    t0 = min(h[b][0][0] for b in range(grid))
    print(f"\n== {name} {scope}: {median(ts):.1f} us as launched (zeros + kernel, median of 20), grid {grid} "
          f"({ng} groups of {gpb}, {nw} warps, K={plan['K']}), {plan['nsteps']} steps")
    print("   step   landed   published   scale-known   quantized   (median over programs, ns from the first landing)")
    wl = wp = wb = wq = 0.0
    cnt = 0
    for s in range(nsteps):
        bs = [b for b in full if h[b][s][3]]
        v = [[h[b][s][p] - t0 for b in bs] for p in range(4)]
        if s < 4 or s >= nsteps - 2:
            print(f"   {s:4d} {median(v[0]):8.0f} {median(v[1]):11.0f} {median(v[2]):13.0f} {median(v[3]):11.0f}")
        if s >= 2:
            for b in full:
                if not (h[b][s][1] and h[b][s - 1][2] and h[b][s - 1][3] and h[b][s - 2][3]):
                    continue
                wl += h[b][s][0] - h[b][s - 2][3]
                wp += h[b][s][1] - h[b][s][0]
                wb += h[b][s - 1][2] - h[b][s][1]
                wq += h[b][s - 1][3] - h[b][s - 1][2]
                cnt += 1
    starts = [h[b][64][0] for b in range(grid)]
    last = max(max(h[b][s][3] for s in range(nsteps)) for b in range(grid))
    fill = [h[b][0][0] - h[b][64][0] for b in range(grid)]
    tail = [h[b][nsteps - 1][3] - h[b][nsteps - 1][0] for b in full if h[b][nsteps - 1][3]]
    print(f"   program start (median) {median([t - t0 for t in starts]):.0f} ns from the first landing; start -> own first "
          f"landing {median(fill):.0f}; last step landed -> quantized {median(tail):.0f}; first start -> last quantized "
          f"{last - min(starts):.0f} ns; starts spread over {max(starts) - min(starts)} ns")
    if cnt:
        print(f"   mean per program-iteration (s >= 2): landing wait {wl / cnt:.0f} ns, publish {wp / cnt:.0f}, barrier wait "
              f"{wb / cnt:.0f}, quantize {wq / cnt:.0f}")


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), "triton", tq.triton.__version__)
    for name, shape in [("llama3-8b", (32, 4096, 8, 128)), ("smollm2", (30, 4096, 3, 64))]:
        for scope in ("tensor", "head"):
            run(name, *shape, scope)
