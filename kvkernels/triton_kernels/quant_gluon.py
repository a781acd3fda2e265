"""Gluon kernels (GPU only, no interpreter; KVK_GLUON=0 turns them off): int token dequantize
(_dq_int_token_gl) and the one-pass fp8 tensor/head quantize (_q_fp8_resident_gl), with their
launch plans. tests/gluon_sm90.py compiles them for sm_90. See quant.py."""
from __future__ import annotations

import functools
import os

import torch
import triton

try:  # Gluon: Triton's explicit-layout dialect (triton >= 3.5); GPU only, no interpreter
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    # cp.async into shared memory: async_load since Triton 3.7, async_copy_global_to_shared before
    _gl_async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
    # the block barrier: thread_barrier in Triton 3.6, barrier in 3.9
    _gl_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
except ImportError:  # pragma: no cover - older Triton: the tl kernel runs instead
    gluon = gl = None

from ..formats import QuantFormat
from .quant_common import _INTERPRET, _LAUNCH, _capability, _geometry, _p2
from .quant_int import _token_parts, _token_strides


if gluon is not None:
    @gluon.jit
    def _dq_int_token_gl(codes_ptr, scale_ptr, zero_ptr, out_ptr, T, H, s_l, s_t, s_h, tg0,
                         D: gl.constexpr, DV: gl.constexpr, V: gl.constexpr, G: gl.constexpr,
                         TB: gl.constexpr, HB: gl.constexpr, BITS: gl.constexpr, OS: gl.constexpr,
                         CS: gl.constexpr, MASKED: gl.constexpr, HDMASK: gl.constexpr, L4: gl.constexpr):
        # int token dequantize, Gluon (see _dq_token_gluon_params): program pid0 = heads
        # [hb*HB, +HB) of token group tg (+ tg0), hb fastest (the programs running together write
        # whole token rows: heads slowest made 2 KiB-strided 256-byte pieces, int2 84.5% of copy
        # at Llama-3-8B T=32768 against 93.3%), layer pid1; chunks [TB tokens, HB heads, DV vectors, V
        # channels] in layout L4, where a thread owns whole V-channel output vectors (16 bytes).
        # codes_ptr points to words of V codes (V * BITS bits: [L, T, H, D / V]), so a thread's
        # codes are one load; the group's scale / zero [HB, DV, V] are loaded once straight in
        # the output's layout (slice 0 of L4): no layout change, no shared memory. MASKED: a
        # partial group or G % TB != 0 (token masks); HDMASK: padded heads or channels (H % HB,
        # D < DV * V); OS / CS: out / codes token strides (elements / bytes; 0: run time).
        S0: gl.constexpr = gl.SliceLayout(0, L4)                      # [HB, DV, V]
        S3: gl.constexpr = gl.SliceLayout(3, L4)                      # [TB, HB, DV] code words
        LT: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, S3))   # [TB]
        S0h: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, S0))
        S0d: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, S0))
        S0j: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, S0))
        S3h: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(0, S3))
        S3d: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(0, S3))
        DW: gl.constexpr = D // V
        NCH: gl.constexpr = (G + TB - 1) // TB
        NGT = (T + G - 1) // G
        NHB = (H + HB - 1) // HB
        pid = gl.program_id(0)
        tg = pid // NHB
        h0 = (pid - tg * NHB) * HB
        tg += tg0
        l = gl.program_id(1).to(gl.int64)
        h = h0 + gl.arange(0, HB, layout=S0h)
        h3 = gl.expand_dims(gl.expand_dims(gl.minimum(h, H - 1), 1), 2)
        ch = (gl.expand_dims(gl.expand_dims(gl.arange(0, DV, layout=S0d), 0), 2) * V
              + gl.expand_dims(gl.expand_dims(gl.arange(0, V, layout=S0j), 0), 1))   # [1, DV, V]
        sz = ((l * NGT + tg) * H + h3) * D + ch
        if DV * V == D:
            scale = gl.load(scale_ptr + sz)
            zero = gl.load(zero_ptr + sz)
        else:
            scale = gl.load(scale_ptr + sz, mask=ch < D, other=0.0)
            zero = gl.load(zero_ptr + sz, mask=ch < D, other=0.0)
        scale = gl.expand_dims(scale, 0)
        zero = gl.expand_dims(zero, 0)
        ohd = gl.expand_dims(h3.to(gl.int64) * s_h + ch, 0)                         # [1, HB, DV, V]
        hd_mask = gl.expand_dims(gl.expand_dims(gl.expand_dims(h < H, 1), 2) & (ch < D), 0)
        hw = gl.minimum(h0 + gl.arange(0, HB, layout=S3h), H - 1)
        dw = gl.minimum(gl.arange(0, DV, layout=S3d), DW - 1)
        cw = gl.expand_dims(gl.expand_dims(hw, 1) * DW + gl.expand_dims(dw, 0), 0)  # [1, HB, DV]
        shift = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.arange(0, V, layout=S0j), 0), 1), 0) * BITS
        if OS == 0:
            os = s_t
        else:
            os = OS
        if CS == 0:
            cs = H * DW
        else:
            cs = CS // (V * BITS // 8)
        t0 = tg * G
        n = gl.minimum(T - t0, G)
        ob = out_ptr + (l * s_l + t0.to(gl.int64) * s_t)
        cb = codes_ptr + (l * T + t0) * H * DW
        for c in gl.static_range(NCH):
            ti = c * TB + gl.arange(0, TB, layout=LT)
            if MASKED:
                tc = gl.minimum(ti, n - 1)
            else:
                tc = ti
            w = gl.load(cb + (gl.expand_dims(gl.expand_dims(tc * cs, 1), 2) + cw))
            if V * BITS > 32:   # int8 into 16-bit outputs: 8 codes, a 64-bit word
                q = ((gl.expand_dims(w, 3) >> shift.to(gl.int64)) & 255).to(gl.int32)
            else:
                q = (gl.expand_dims(w.to(gl.int32), 3) >> shift) & ((1 << BITS) - 1)
            y = gl.fma(_code_to_float_gl(q), scale, zero).to(out_ptr.dtype.element_ty)
            to = gl.expand_dims(gl.expand_dims(gl.expand_dims(tc.to(gl.int64) * os, 1), 2), 3)
            if MASKED:
                tm = gl.expand_dims(gl.expand_dims(gl.expand_dims(ti < n, 1), 2), 3)
                gl.store(ob + (to + ohd), y, mask=tm & hd_mask)
            elif HDMASK:
                gl.store(ob + (to + ohd), y, mask=hd_mask)
            else:
                gl.store(ob + (to + ohd), y)

    @gluon.jit
    def _res_bases(p, s_lv, Nlv, VE: gl.constexpr, HS: gl.constexpr, D: gl.constexpr):
        """Where (pseudo-)layer p starts in x and in codes (elements, int64): layer p, or with
        HS > 1 head p % HS of layer p // HS. Layer strides in 16-byte vectors (s_lv, Nlv), so
        that the compiler knows the bases are 16-byte aligned (16-byte cp.async)."""
        if HS > 1:
            l = (p // HS).to(gl.int64)
            h = (p % HS).to(gl.int64)
            return (l * s_lv + h * (D // VE)) * VE, (l * Nlv + h * (D // VE)) * VE
        else:
            return p.to(gl.int64) * s_lv * VE, p.to(gl.int64) * Nlv * VE

    @gluon.jit
    def _q_fp8_resident_gl(x_ptr, codes_ptr, scale_ptr, slots_ptr, s_lv, Nlv, Nv, nL, nsteps, NG, gpb,
                           VE: gl.constexpr, K: gl.constexpr, HS: gl.constexpr, D: gl.constexpr,
                           NW: gl.constexpr, GP2: gl.constexpr, tr_ptr=None, TRACE: gl.constexpr = False):
        # fp8 tensor scope with computed scales over nL (pseudo-)layers of Nv 16-byte vectors, in
        # one pass over x: the Gluon form of the CUDA quant_fp8_resident_kernel's block groups
        # (csrc/quant.cu). The grid (co-resident: a cooperative launch, 32 / NW programs of NW
        # warps an SM) is NG groups of gpb programs; at step s group grp holds (pseudo-)layer
        # s * NG + grp, each program K vectors a thread. A step's vectors are copied into shared
        # memory (cp.async, 3 stages: steps s+1 and s+2 load while step s - 1 is quantized), its
        # amax goes to the program's slot (bit 31 set: full; one relaxed store, the value is the
        # message), and the group's programs wait for all gpb slots of the layer (polled by warp
        # 0) before quantizing it from shared memory. With HS > 1, a pseudo-layer is one head
        # [T, D] of a layer (rows of C = D / VE vectors, HS * C apart): the head scope.
        # Four block barriers a step (twelfth session, bench/results/fp8-onepass-12th-h200-
        # 2026-11-27.txt; eight before: 83 -> 87% of copy on Llama-3-8B fp8:tensor T=4096):
        # Triton's before the stage is read (a thread reads only the vectors it copied, but
        # Triton cannot know), the per-warp maxima's, the hand-on's, and one before the next
        # step's loads into the stage just quantized. MERGE (the tensor scope, HS == 1): the
        # maxima and the hand-on share one, so the program's publish of step s waits for warp
        # 0's poll of step s - 1: three a step, +2 points on the tensor rows (Llama-3-8B 86-87
        # -> 89%, SmolLM2 88-90 -> 90-93%) but -3 to -8 on the heads' (so not for HS > 1).
        # slots: [nL, gpb] int32, zeroed by the caller. GP2: gpb padded to a power of two.
        NT: gl.constexpr = NW * 32
        R: gl.constexpr = K * NT
        C: gl.constexpr = D // VE
        FULL: gl.constexpr = -2147483648
        MERGE: gl.constexpr = HS == 1
        L2: gl.constexpr = gl.BlockedLayout([1, VE], [32, 1], [NW, 1], [1, 0])
        # the slots of a layer, [RS, 32]: all in each warp (the warps hold copies), slot
        # 32 r + lane in register r, so that each poll load of a warp reads 32 consecutive slots
        # (thirteenth session: RS consecutive slots a lane, 4 lines a load at 128 programs, was
        # up to 2 points slower on SmolLM2 fp8:tensor, equal elsewhere)
        RS: gl.constexpr = max(1, GP2 // 32)
        LS: gl.constexpr = gl.BlockedLayout([RS, 1], [1, 32], [1, NW], [1, 0])
        SH: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        # the amax of a step: a stage viewed as [K, NW, 32, VE] (row r = k NT + 32 w + lane), so
        # that a warp reduces its own rows without the other warps; one value a warp [NW] (LW)
        # then goes through shared memory (one barrier), read by every warp whole, a value a lane
        # (LR), and reduced in the warp
        L4: gl.constexpr = gl.BlockedLayout([1, 1, 1, VE], [1, 1, 32, 1], [1, NW, 1, 1], [3, 2, 1, 0])
        L3: gl.constexpr = gl.SliceLayout(3, L4)
        LKW: gl.constexpr = gl.SliceLayout(2, L3)
        LW: gl.constexpr = gl.SliceLayout(0, LKW)
        LR: gl.constexpr = gl.BlockedLayout([1], [32], [NW], [0])
        SH1: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        pid = gl.program_id(0)
        grp = pid // gpb
        bl = pid - grp * gpb
        r = gl.arange(0, R, layout=gl.SliceLayout(1, L2))
        vec = (r // NT) * (gpb * NT) + bl * NT + (r % NT)   # thread i's vectors: i + NT k of this program
        if HS > 1:
            row = vec // C
            off = row * (HS * C) + (vec - row * C)
        else:
            off = vec
        offe = gl.expand_dims(off * VE, 1) + gl.expand_dims(gl.arange(0, VE, layout=gl.SliceLayout(0, L2)), 0)
        valid = gl.expand_dims(vec < Nv, 1) & (offe >= 0)     # [R, VE]
        k3 = gl.expand_dims(gl.expand_dims(gl.arange(0, K, layout=gl.SliceLayout(1, LKW)), 1), 2)
        w3 = gl.expand_dims(gl.expand_dims(gl.arange(0, NW, layout=LW), 0), 2)
        l3 = gl.expand_dims(gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3))), 0), 1)
        valid3 = (k3 * (gpb * NT) + bl * NT + w3 * 32 + l3) < Nv   # [K, NW, 32]: rows of the layer
        stages = gl.allocate_shared_memory(x_ptr.dtype.element_ty, [3, R, VE], SH)
        red = gl.allocate_shared_memory(gl.int32, [2, NW], SH1)    # per-warp maxima, by step parity
        hand = gl.allocate_shared_memory(gl.int32, [2, NW], SH1)   # warp 0's polled amax, by parity
        si = (gl.expand_dims(gl.arange(0, RS, layout=gl.SliceLayout(1, LS)), 1) * 32
              + gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(0, LS)), 0))
        # warp 0 polls: thread ids by inline asm (the slots' layout gives every warp all of them)
        poller = _tid_gl(si) < 32
        # TRACE (developer, experiments/gluon_trace_exp.py): %globaltimer of each program at its
        # start and at four points of each of the first 64 steps, as the CUDA kernel's trace
        if TRACE:
            _trace_gl(tr_ptr, pid, 64, 0, NW, True)
        for s in range(-2, nsteps + 1):
            pq = (s - 1) * NG + grp   # the layer quantized this iteration (step s - 1)
            qa = (s >= 1) & (pq < nL)
            # its slots' first poll, early: the load overlaps the step's amax (masked off if none)
            sp = slots_ptr + pq * gpb + si
            pm = (si < gpb) & poller & qa
            v = gl.load(sp, mask=pm, other=FULL, volatile=True)
            p = s * NG + grp          # the layer published this iteration (step s)
            pa = (s >= 0) & (s < nsteps) & (p < nL)
            if s >= 0:
                # step s has landed (this thread's copies; a thread reads only its own vectors)
                _cp_async_wait1_gl(pid)
                if TRACE:
                    _trace_gl(tr_ptr, pid, s, 0, NW)
            if pa:  # this program's amax of step s, over finite values only (the spec's amax)
                a = stages.index(s % 3).reshape([K, NW, 32, VE]).load(L4)
                # one instruction an element: g = (bits << 1) + 0x81000000 (int32, wrapping; the
                # sign shifts out) orders finite |x| as [-0x7F000000, 0x7FFFFFFE] and puts Inf /
                # NaN below all of them ([-2^31, -0x7F000002]); a select per element to drop them
                # cost 32 instructions a step (SmolLM2 fp8:head, K = 4: 720 -> 784)
                g = (a.to(gl.float32).to(gl.int32, bitcast=True) << 1) + (-0x7F000000)
                mg = gl.reduce(gl.reduce(gl.where(valid3, gl.reduce(g, 3, _imax_gl), -2147483648), 2, _imax_gl), 0,
                               _imax_gl)
                # back to |x| bits, 0 if no finite value
                mw = gl.where(mg >= -0x7F000000, ((mg + 0x7F000000) >> 1) & 0x7FFFFFFF, 0)
                red.index(s % 2).store(mw)
                if not MERGE:
                    m = gl.reduce(red.index(s % 2).load(LR), 0, _imax_gl)
                    gl.atomic_xchg(slots_ptr + p * gpb + bl, m | FULL, sem="relaxed", scope="gpu")
                    if TRACE:
                        _trace_gl(tr_ptr, pid, s, 1, NW)
            if qa:  # step s - 1: warp 0 waits for the group's slots (a warp-local reduction;
                # the other warps' loads are masked off, so they pass) and hands the layer's amax
                # to every warp through shared memory
                while gl.reduce(gl.reduce(v, 1, _imax_gl), 0, _imax_gl) >= 0:
                    v = gl.load(sp, mask=pm, other=FULL, volatile=True)
                am = gl.reduce(gl.reduce(v & 0x7FFFFFFF, 1, _imax_gl), 0, _imax_gl)   # warp 0: the layer's amax; others 0
                hand.index(s % 2).store(gl.full([NW], 0, gl.int32, LW) + am)
            if MERGE:  # one barrier for the step's amax and the hand-on; the publish waits for it
                _gl_barrier()
                if pa:
                    m = gl.reduce(red.index(s % 2).load(LR), 0, _imax_gl)
                    gl.atomic_xchg(slots_ptr + p * gpb + bl, m | FULL, sem="relaxed", scope="gpu")
                    if TRACE:
                        _trace_gl(tr_ptr, pid, s, 1, NW)
            if qa:  # scale, quantize from shared memory
                mb = gl.reduce(hand.index(s % 2).load(LR), 0, _imax_gl)
                if TRACE:
                    _trace_gl(tr_ptr, pid, s - 1, 2, NW)
                sc = gl.div_rn(mb.to(gl.float32, bitcast=True), 448.0)
                sc = gl.where(sc > 0, gl.maximum(sc, 1.1754943508222875e-38), 1.0)   # >= FLT_MIN
                inv = gl.minimum(gl.div_rn(1.0, sc), 3.4028234663852886e38)
                if bl == 0:
                    gl.store(scale_ptr + pq, sc)
                xb, cb = _res_bases(pq, s_lv, Nlv, VE, HS, D)
                y = stages.index((s - 1) % 3).load(L2).to(gl.float32) * inv
                c = y.to(gl.float8e4nv).to(gl.uint8, bitcast=True)
                gl.store(codes_ptr + cb + offe, c, mask=valid)
                if TRACE:
                    _trace_gl(tr_ptr, pid, s - 1, 3, NW)
            # step s + 2: its loads start, into the stage that step s - 1 held. The barrier (a
            # thread reads only the vectors it copied, but Triton cannot know) is on every path
            # through the loop, so that Triton adds none before the next step's hand-on store
            _gl_barrier()
            pn = (s + 2) * NG + grp
            if (s + 2 < nsteps) & (pn < nL):
                xb, cb = _res_bases(pn, s_lv, Nlv, VE, HS, D)
                _gl_async_load(stages.index((s + 2) % 3), x_ptr + xb + offe, mask=valid)
            async_copy.commit_group()

    @gluon.jit
    def _cp_async_wait1_gl(like):
        """cp.async.wait_group 1: this thread's copies but the newest group have landed. Unlike
        async_copy.wait_group it adds no block barrier; Triton puts one before the first read
        of the stage, which makes the copies visible to the block."""
        return gl.inline_asm_elementwise("cp.async.wait_group 1;\n\tmov.u32 $0, 0;", "=r,r", [like], dtype=gl.int32,
                                         is_pure=False, pack=1)

    @gluon.jit
    def _trace_gl(tr_ptr, pid, s, phase: gl.constexpr, NW: gl.constexpr, START: gl.constexpr = False):
        """%globaltimer -> tr_ptr[(pid * 65 + s) * 4 + phase] (int64) for steps s < 64; with
        START the program's start, at row 64."""
        LT: gl.constexpr = gl.BlockedLayout([1], [32], [NW], [0])
        if START or s < 64:
            z = gl.full([1], 0, gl.int32, LT)
            t = gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [z], dtype=gl.int64, is_pure=False,
                                          pack=1)
            gl.store(tr_ptr + ((pid * 65 + s) * 4 + phase) + gl.arange(0, 1, layout=LT), t)

    @gluon.jit
    def _tid_gl(like):
        """threadIdx.x, shaped and laid out like ``like`` (int32)."""
        return gl.inline_asm_elementwise("mov.u32 $0, %tid.x;", "=r,r", [like], dtype=gl.int32, is_pure=True,
                                         pack=1)

    @gluon.jit
    def _imax_gl(a, b):  # (gl.max is a tl.jit function: under TRITON_INTERPRET=1 Gluon cannot compile it)
        return gl.maximum(a, b)

    @gluon.jit
    def _code_to_float_gl(q):
        return (q | 0x4B000000).to(gl.float32, bitcast=True) - 8388608.0


def _gluon_on(t: torch.Tensor) -> bool:
    """Whether the Gluon kernels may run for tensors like t: Gluon importable, a CUDA tensor (no
    interpreter) and not turned off by KVK_GLUON=0 (then the tl kernels run)."""
    return gluon is not None and not _INTERPRET and t.device.type == "cuda" and os.environ.get("KVK_GLUON") != "0"


# int token dequantize in Gluon (_dq_int_token_gl); the tl kernel _dq_int_token elsewhere.
_CODE_WORD = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _dq_token_gluon_ok(codes, out, fmt: QuantFormat) -> bool:
    """Whether dequantize_into runs the Gluon token kernel: a GPU, Gluon importable, whole
    16-byte output vectors per thread (head_dim a multiple of them) and codes that can be read as
    words of one vector's codes (the word size divides the codes' byte offset)."""
    if not _gluon_on(out):
        return False
    V = 16 // out.element_size()
    D = int(out.shape[-1])
    cw = V * fmt.bits // 8
    return fmt.kind == "int" and fmt.axis == "token" and D % V == 0 and codes.data_ptr() % cw == 0


def _dq_token_gluon_params(H: int, D: int, esize: int, G: int, bits: int):
    """The tile of _dq_int_token_gl: (HB, constexprs, warps). One token group of HB heads,
    TB = min(G, 32) tokens a chunk; a thread owns V = 16 / element size channels (one 16-byte
    output vector; V codes: one load). Lanes go to the vectors of a row first, then heads, then
    tokens; warps to heads, then tokens. HB (H200, bench/results/gluon-dq-token-h200-2026-11-27.txt):
    1 for a power-of-two head count (Llama-3-8B int2 g32: 91.6-93.3% of copy; 2 heads:
    90.6-92.0%, 4: 89.5-90.2%); otherwise all heads padded to a power of two up to 4 (SmolLM2's
    3, int8/4/2: 91-96% at HB = 4, 86-92% at HB = 1, 82-94% at HB = 2); more heads when
    TB x (D / V) vectors would leave lanes of 4 warps idle."""
    V = 16 // esize
    DV = _p2(D // V)
    TB = min(_p2(G), 32)
    HB = 1 if H & (H - 1) == 0 or _p2(H) > 4 else _p2(H)
    HB = min(_p2(H), max(HB, 128 // (TB * DV)))
    W = max(1, min(4, TB * HB * DV // 32))
    tpd = min(DV, 32)
    tph = min(HB, 32 // tpd)
    tpt = 32 // (tpd * tph)
    wh = min(max(1, HB // tph), W)
    L4 = gl.BlockedLayout([1, 1, 1, V], [tpt, tph, tpd, 1], [W // wh, wh, 1, 1], [3, 2, 1, 0])
    consts = dict(D=D, DV=DV, V=V, G=G, TB=TB, HB=HB, BITS=bits, HDMASK=H % HB != 0 or DV * V != D, L4=L4)
    return HB, consts, W


def _dq_token_gluon_launch(codes, scale, zero, fmt: QuantFormat, out) -> None:
    L, T, H, D, s_l, s_t, s_h, es, _ = _geometry(out)
    G = min(fmt.group_size, T)  # a group longer than T is the one group of all T
    HB, consts, W = _dq_token_gluon_params(H, D, es, G, fmt.bits)
    words = codes.view(_CODE_WORD[consts["V"] * fmt.bits // 8])
    OS, CS = _token_strides(s_t, es, G, H, D, fmt.per_byte)
    for tg0, n, part in _token_parts(T, G):
        _dq_int_token_gl[(n * triton.cdiv(H, HB), L)](
            words, scale, zero, out, T, H, s_l, s_t, s_h, tg0, OS=OS, CS=CS,
            MASKED=part or G % consts["TB"] != 0, **consts, num_warps=W, **_LAUNCH)


# fp8 tensor / head scopes with computed scales in one pass (_q_fp8_resident_gl); the amax +
# quantize kernels elsewhere.
_RES_STEP_BYTES = 8 << 20       # input bytes a step (as the CUDA kernel)
_RES_MIN_VECTORS = 4 * 1024     # (pseudo-)layers of fewer vectors leave a group's threads idle


@functools.lru_cache(maxsize=None)
def _sm_count(index) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _fp8_resident_groups(nL: int, Nv: int, sms: int, warps: int):
    """Block groups with programs of ``warps`` warps (1024 / (32 warps) an SM): as many
    (pseudo-)layers a step as 8 MiB of input holds, evened over the steps, with the fewest
    vectors a thread (K) that lets that many groups of gpb = ceil(Nv / (32 warps K)) programs
    fit. (NG, gpb, K, steps), or None if a layer does not fit with K = 4."""
    nt = warps * 32
    slots = sms * (1024 // nt)
    gpb = lambda k: -(-Nv // (nt * k))  # noqa: E731
    if gpb(4) > slots:
        return None
    want = min(max(1, _RES_STEP_BYTES // (Nv * 16)), nL)
    ng = -(-nL // -(-nL // want))
    K = next((k for k in (1, 2, 4) if slots // gpb(k) >= ng), 4)
    ng = min(ng, slots // gpb(K))
    return ng, gpb(K), K, -(-nL // ng)


def _fp8_resident_plan(x, codes, fmt: QuantFormat):
    """Launch parameters of _q_fp8_resident_gl for x, or None where it does not apply: the
    layout is not dense per layer, a (pseudo-)layer has fewer than _RES_MIN_VECTORS 16-byte
    vectors or more than the chip holds (SMs x 1024 threads x 4 vectors), the GPU is not a
    Hopper (sm_90), or Gluon is off. The head scope runs as the tensor scope over L * H heads
    [T, D].
    Warps a program (H200, bench/results/gluon-fp8-onepass-h200-2026-11-27.txt, measured with
    the eleventh session's kernel, eight block barriers a step): fewer warps
    (more programs an SM) overlap one program's barriers with another's work, but warp 0 of
    every program polls its group's gpb slots, which costs more than that gains from about
    128 slots on (Llama-3-8B fp8:tensor T=4096, gpb = 512 / 256 / 128 at 8 / 16 / 32 warps:
    10 / 54 / 83% of copy). So: 8 warps if gpb <= 64 (Llama-3-8B fp8:head T=4096: 97%, 94%
    at 16 warps), else 16 if gpb <= 128 (SmolLM2 fp8:head T=32768: 90%, 85% at 32), else 32."""
    if not _gluon_on(x) or _capability(x.device.index)[0] != 9:  # Hopper: measured there; the
        return None                          # programs' shared memory assumes 227 KiB an SM
    L, T, H, D, s_l, s_t, s_h, es, _ = _geometry(x)
    VE = 16 // es
    dense = (T == 1 or s_t == H * D) and (H == 1 or s_h == D)
    if not dense or D % VE or x.data_ptr() % 16 or s_l % VE or codes.data_ptr() % 16 or T * H * D >= 2**31:
        return None  # (offsets within a layer are int32)
    HS = H if fmt.scope == "head" and H > 1 else 1
    nL, Nv = L * HS, T * H * D // VE // HS
    sms = _sm_count(x.device.index)
    if Nv < _RES_MIN_VECTORS or nL >= 2**31 // (4 * sms):
        return None
    g = None
    for warps, most in ((8, 64), (16, 128), (32, None)):
        g = _fp8_resident_groups(nL, Nv, sms, warps)
        if g is not None and (most is None or g[1] <= most):
            break
    if g is None:
        return None
    ng, gpb, K, nsteps = g
    return dict(nL=nL, Nv=Nv, nsteps=nsteps, NG=ng, gpb=gpb, K=K, HS=HS, VE=VE, D=D, s_lv=s_l // VE,
                Nlv=T * H * D // VE, warps=warps)


def _q_fp8_resident_launch(x, codes, scale, plan) -> None:
    gpb, ng, nw = plan["gpb"], plan["NG"], plan["warps"]
    slots = torch.zeros(plan["nL"] * gpb, dtype=torch.int32, device=x.device)
    _q_fp8_resident_gl[(ng * gpb,)](
        x, codes, scale, slots, plan["s_lv"], plan["Nlv"], plan["Nv"], plan["nL"], plan["nsteps"], ng, gpb,
        VE=plan["VE"], K=plan["K"], HS=plan["HS"], D=plan["D"], NW=nw, GP2=_p2(gpb),
        num_warps=nw, maxnreg=64, launch_cooperative_grid=True, **_LAUNCH)
