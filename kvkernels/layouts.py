"""Paged KV-cache layouts as one declarative value (docs/paged.md).

A serving engine keeps, per layer, a K cache and a V cache (or one latent cache for MLA) made of
``num_blocks`` blocks of ``block_size`` tokens. Every layout of every engine is described here by
the same few numbers, read from the real tensors' STRIDES (never from their shapes), so that a
permuted view (HND handed over as a permuted NHD view, vLLM's K|V halves of one tensor) is
addressed correctly. Element ``(block b, token-in-block t, head h, channel d)`` of the cache of
(kv, layer) lives at::

    base[kv, layer] + b*s_block + t*s_token + h*s_head + (d // x)*s_dim_outer + (d % x)*s_dim_inner

in elements of the cache dtype, where ``x`` splits head_dim (vLLM's legacy K cache
``[NB, H, D/x, BS, x]``; ``x = head_dim`` elsewhere, then ``d // x == 0``). The strides may
differ between K and V (legacy V is ``[NB, H, D, BS]``: ``s_dim_inner = BS``) but are the same
for every layer; the per-(kv, layer) base addresses are an int64 device tensor ``ptrs``
(``[num_kv * num_layers]``, kv-major: K of layers 0..L-1, then V of layers 0..L-1). That is all a
kernel reads: adding a layout is adding a constructor, never a kernel.

:class:`PagedLayout` is that value (hashable on the geometry and strides; it also holds the
tensors it was built from, so that ops can declare them mutated, and the ``ptrs`` tensor).
Constructors are named after the engines: :meth:`PagedLayout.vllm_flash`,
:meth:`PagedLayout.flashinfer`, :meth:`PagedLayout.vllm_kv_interleaved` (vLLM 2026
``[NB, H, BS, 2*D]``), :meth:`PagedLayout.vllm_legacy`, :meth:`PagedLayout.cross_layer`,
:meth:`PagedLayout.sglang`, :meth:`PagedLayout.sglang_mla`, :meth:`PagedLayout.mla` and the
general :meth:`PagedLayout.from_tensors`.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple, Union

import torch

CACHE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.uint8)
# dtype codes shared by the kernels (csrc/paged.h): 0 fp32, 1 fp16, 2 bf16, 3 fp8 e4m3 (bytes)
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float8_e4m3fn: 3, torch.uint8: 3}
ORDERS = ("NHD", "HND")

Strides = Tuple[int, int, int, int, int]  # (block, token, head, dim_outer, dim_inner), elements


def _tensors(name: str, ts) -> List[torch.Tensor]:
    if isinstance(ts, torch.Tensor):
        raise TypeError(f"{name}: expected a list of per-layer tensors, got one tensor "
                        f"(wrap it in a list, or use a constructor that takes a stacked tensor)")
    if not isinstance(ts, (list, tuple)) or not ts:
        raise TypeError(f"{name}: expected a non-empty list of tensors, got {type(ts).__name__}")
    for i, t in enumerate(ts):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}]: expected a torch.Tensor, got {type(t).__name__}")
    return list(ts)


def _same(name: str, ts: Sequence[torch.Tensor]) -> None:
    t0 = ts[0]
    for i, t in enumerate(ts[1:], 1):
        if t.shape != t0.shape or t.stride() != t0.stride() or t.dtype != t0.dtype or t.device != t0.device:
            raise ValueError(f"{name}[{i}]: every layer must have the shape, strides, dtype and device of "
                             f"{name}[0] ({tuple(t0.shape)}, {t0.stride()}, {t0.dtype}, {t0.device}); got "
                             f"{tuple(t.shape)}, {t.stride()}, {t.dtype}, {t.device}")


@dataclasses.dataclass(frozen=True)
class PagedLayout:
    """Where every (layer, K/V, block, token, head, channel) of an engine's paged caches lives.

    Fields (the declarative value; equal layouts address memory identically up to ``ptrs``):

    * ``engine``: the constructor's name (``"vllm_flash"``, ...), informational.
    * ``num_layers``, ``num_kv`` (2: K and V; 1: one latent cache, MLA), ``num_blocks``,
      ``block_size``, ``num_heads``, ``head_dim``.
    * ``dtype``: the caches' element type; ``fp8``: elements are float8 e4m3 codes (dtype
      ``float8_e4m3fn``, or ``uint8`` as SGLang stores them).
    * ``strides``: per kv (K, then V), ``(block, token, head, dim_outer, dim_inner)`` in elements,
      read from the tensors; ``x``: the head_dim split (``head_dim`` when there is none).
    * ``device``.

    Not compared: ``bases`` (one tensor per (kv, layer), kv-major, whose ``data_ptr()`` is that
    cache's element (0, 0, 0, 0)) and ``ptrs`` (their addresses as an int64 tensor on ``device``,
    built once here so that calls need no host-to-device copy and stay CUDA-graph capturable).
    The caches must outlive the layout; rebuild it if the engine reallocates them.
    """

    engine: str
    num_layers: int
    num_kv: int
    num_blocks: int
    block_size: int
    num_heads: int
    head_dim: int
    dtype: torch.dtype
    fp8: bool
    strides: Tuple[Strides, ...]
    x: int
    device: torch.device
    bases: Tuple[torch.Tensor, ...] = dataclasses.field(compare=False, hash=False, repr=False, default=())
    ptrs: Optional[torch.Tensor] = dataclasses.field(compare=False, hash=False, repr=False, default=None)

    # ---- derived ------------------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        """Valid slots are ``0 <= slot < num_blocks * block_size``."""
        return self.num_blocks * self.block_size

    @property
    def element_size(self) -> int:
        return 1 if self.fp8 else torch.empty((), dtype=self.dtype).element_size()

    def spec(self) -> List[int]:
        """The layout as the ints every kernel takes (csrc/paged.h ``KvkPagedLayout``):
        ``[L, num_kv, NB, BS, H, D, x, dtype_code, *K strides(5), *V strides(5)]`` (V = K for
        ``num_kv == 1``)."""
        v = self.strides[-1]
        return [self.num_layers, self.num_kv, self.num_blocks, self.block_size, self.num_heads, self.head_dim,
                self.x, DTYPE_CODE[self.dtype], *self.strides[0], *v]

    def views(self) -> List[torch.Tensor]:
        """Each (kv, layer) cache as a strided view ``[NB, BS, H, D // x, x]`` of its tensor
        (kv-major), the canonical order the reference indexes; fp8 caches viewed as uint8."""
        out = []
        for i, b in enumerate(self.bases):
            sB, sT, sH, sDX, sDI = self.strides[i // self.num_layers]
            t = b.view(torch.uint8) if self.fp8 and b.dtype != torch.uint8 else b
            out.append(t.as_strided((self.num_blocks, self.block_size, self.num_heads, self.head_dim // self.x, self.x),
                                    (sB, sT, sH, sDX, sDI), t.storage_offset()))
        return out

    def owners(self) -> List[torch.Tensor]:
        """The distinct tensors written through (one per base; the op declares them mutated)."""
        return list(self.bases)

    def __str__(self) -> str:
        kv = "K,V" if self.num_kv == 2 else "latent"
        return (f"PagedLayout.{self.engine}(L={self.num_layers}, {kv}, NB={self.num_blocks}, BS={self.block_size}, "
                f"H={self.num_heads}, D={self.head_dim}, {self.dtype}{' fp8' if self.fp8 else ''}, "
                f"strides={self.strides}, x={self.x})")

    # ---- the general constructor ----------------------------------------------------------
    @staticmethod
    def from_strided(engine: str, bases: Sequence[torch.Tensor], num_layers: int, num_kv: int, num_blocks: int,
                     block_size: int, num_heads: int, head_dim: int, strides: Sequence[Strides], x: Optional[int] = None,
                     fp8: Optional[bool] = None) -> "PagedLayout":
        """Build from explicit per-(kv, layer) base tensors and strides (elements). Every other
        constructor ends here; the addressed extent is checked against each base's storage."""
        bases = list(bases)
        if len(bases) != num_kv * num_layers:
            raise ValueError(f"bases: expected {num_kv * num_layers} tensors (num_kv x num_layers), got {len(bases)}")
        b0 = bases[0]
        dtype = b0.dtype
        if dtype not in CACHE_DTYPES:
            raise TypeError(f"caches: expected dtype in {[str(d) for d in CACHE_DTYPES]}, got {dtype}")
        for i, b in enumerate(bases):
            if b.dtype != dtype or b.device != b0.device:
                raise ValueError(f"caches: every cache must have dtype {dtype} and device {b0.device}; "
                                 f"cache {i} has {b.dtype} on {b.device}")
        if fp8 is None:
            fp8 = dtype in (torch.float8_e4m3fn, torch.uint8)
        if dtype == torch.uint8 and not fp8:
            raise TypeError("caches: uint8 caches hold fp8 e4m3 codes (SGLang); pass fp8=True")
        if fp8 and dtype not in (torch.float8_e4m3fn, torch.uint8):
            raise TypeError(f"fp8: caches of dtype {dtype} cannot hold fp8 codes (need float8_e4m3fn or uint8)")
        x = head_dim if x is None else int(x)
        for name, v in (("num_layers", num_layers), ("num_blocks", num_blocks), ("block_size", block_size),
                        ("num_heads", num_heads), ("head_dim", head_dim), ("x", x)):
            if int(v) < 1:
                raise ValueError(f"{name}: expected a positive size, got {v}")
        if num_kv not in (1, 2):
            raise ValueError(f"num_kv: expected 1 or 2, got {num_kv}")
        if head_dim % x:
            raise ValueError(f"x: the head_dim split {x} must divide head_dim {head_dim}")
        strides = tuple(tuple(int(s) for s in st) for st in strides)
        if len(strides) != num_kv or any(len(s) != 5 for s in strides):
            raise ValueError(f"strides: expected {num_kv} tuples of 5 strides, got {strides}")
        esize = b0.element_size()
        sizes = (num_blocks, block_size, num_heads, head_dim // x, x)
        for i, b in enumerate(bases):
            st = strides[i // num_layers]
            if any(s < 0 for s in st):
                raise ValueError(f"strides: negative strides are not supported, got {st}")
            if any(s == 0 and n > 1 for n, s in zip(sizes, st)):
                raise ValueError(f"strides: a dim of size > 1 with stride 0 (elements aliasing) in {st} over {sizes}")
            hi = b.storage_offset() + sum((n - 1) * s for n, s in zip(sizes, st))
            if (hi + 1) * esize > b.untyped_storage().nbytes():
                raise ValueError(f"caches: cache {i} (kv {i // num_layers}, layer {i % num_layers}) is smaller than "
                                 f"its layout addresses (strides {st} over {sizes})")
        ptrs = torch.tensor([b.data_ptr() for b in bases], dtype=torch.int64).to(b0.device)
        return PagedLayout(engine=engine, num_layers=int(num_layers), num_kv=int(num_kv), num_blocks=int(num_blocks),
                           block_size=int(block_size), num_heads=int(num_heads), head_dim=int(head_dim), dtype=dtype,
                           fp8=bool(fp8), strides=strides, x=x, device=b0.device, bases=tuple(bases), ptrs=ptrs)

    @staticmethod
    def from_tensors(k_caches, v_caches=None, *, order: str = "NHD", engine: str = "from_tensors",
                     fp8: Optional[bool] = None) -> "PagedLayout":
        """Per-layer caches in a LOGICAL dim order, any physical order (strides are read).

        Args:
            k_caches: list (one per layer) of ``[NB, BS, H, D]`` (``order="NHD"``) or
                ``[NB, H, BS, D]`` (``"HND"``) tensors (views with any strides, e.g. the K half
                of vLLM's ``[NB, H, BS, 2*D]``); 3-D ``[NB, BS, D]`` means one head (MLA).
            v_caches: the V caches, same shape and strides; None for one latent cache (MLA).
            order: which logical order the shapes are in.
            fp8: the elements are e4m3 codes (default: dtype float8_e4m3fn or uint8).
        """
        if order not in ORDERS:
            raise ValueError(f"order: expected one of {ORDERS}, got {order!r}")
        ks = _tensors("k_caches", k_caches)
        _same("k_caches", ks)
        groups = [ks]
        if v_caches is not None:
            vs = _tensors("v_caches", v_caches)
            _same("v_caches", vs)
            if len(vs) != len(ks):
                raise ValueError(f"v_caches: expected {len(ks)} layers like k_caches, got {len(vs)}")
            if vs[0].shape != ks[0].shape:
                raise ValueError(f"v_caches: expected shape {tuple(ks[0].shape)} like k_caches, got {tuple(vs[0].shape)}")
            groups.append(vs)
        strides = []
        for name, g in zip(("k_caches", "v_caches"), groups):
            t = g[0]
            if t.dim() == 3:
                t = t.unsqueeze(2)  # [NB, BS, 1, D]
            elif t.dim() != 4:
                raise ValueError(f"{name}: expected [NB, BS, H, D] / [NB, H, BS, D] (or [NB, BS, D]) per layer, "
                                 f"got shape {tuple(g[0].shape)}")
            if order == "HND" and g[0].dim() == 4:
                NB, H, BS, D = t.shape
                sB, sH, sT, sD = t.stride()
            else:
                NB, BS, H, D = t.shape
                sB, sT, sH, sD = t.stride()
            strides.append((sB, sT, sH, 0, sD))
        return PagedLayout.from_strided(engine, [b for g in groups for b in g], len(ks), len(groups), NB, BS, H, D,
                                        strides, fp8=fp8)

    # ---- engines ------------------------------------------------------------------------
    @staticmethod
    def vllm_flash(kv_caches, value_caches=None, *, order: str = "NHD", kv_dim: Optional[int] = None,
                   fp8: Optional[bool] = None) -> "PagedLayout":
        """vLLM flash-attention / FlashInfer backends.

        Either ``kv_caches`` = per-layer stacked tensors ``[2, NB, BS, H, D]`` (``kv_dim=0``, vLLM
        flash-attn) or ``[NB, 2, BS, H, D]`` (``kv_dim=1``, vLLM's FlashInfer backend), HND
        variants with ``order="HND"`` (``[.., H, BS, D]``); or ``kv_caches`` = key caches and
        ``value_caches`` = value caches, per layer ``[NB, BS, H, D]`` / ``[NB, H, BS, D]``.
        ``kv_dim`` is inferred from the size-2 dim when unambiguous.
        """
        if value_caches is not None:
            return PagedLayout.from_tensors(kv_caches, value_caches, order=order, engine="vllm_flash", fp8=fp8)
        ts = _tensors("kv_caches", kv_caches)
        if ts[0].dim() != 5:
            raise ValueError(f"kv_caches: expected per-layer [2, NB, ...] or [NB, 2, ...] (5-D), got {tuple(ts[0].shape)}")
        if kv_dim is None:
            cand = [d for d in (0, 1) if ts[0].shape[d] == 2]
            if len(cand) != 1:
                raise ValueError(f"kv_dim: cannot tell the K/V dim of shape {tuple(ts[0].shape)}; pass kv_dim=0 or 1")
            kv_dim = cand[0]
        if kv_dim not in (0, 1) or ts[0].shape[kv_dim] != 2:
            raise ValueError(f"kv_dim: expected 0 or 1 with size 2 there, got kv_dim={kv_dim} for {tuple(ts[0].shape)}")
        return PagedLayout.from_tensors([t.select(kv_dim, 0) for t in ts], [t.select(kv_dim, 1) for t in ts],
                                        order=order, engine="vllm_flash", fp8=fp8)

    @staticmethod
    def flashinfer(paged_kv_caches, order: str = "NHD", *, fp8: Optional[bool] = None) -> "PagedLayout":
        """FlashInfer's paged KV cache: per layer ``[NB, 2, BS, H, D]`` (NHD) or
        ``[NB, 2, H, BS, D]`` (HND), or per layer a ``(k_cache, v_cache)`` tuple of
        ``[NB, BS, H, D]`` / ``[NB, H, BS, D]``."""
        ts = list(paged_kv_caches) if isinstance(paged_kv_caches, (list, tuple)) else paged_kv_caches
        if isinstance(ts, list) and ts and isinstance(ts[0], (tuple, list)):
            return PagedLayout.from_tensors([p[0] for p in ts], [p[1] for p in ts], order=order, engine="flashinfer",
                                            fp8=fp8)
        lay = PagedLayout.vllm_flash(ts, order=order, kv_dim=1, fp8=fp8)
        return dataclasses.replace(lay, engine="flashinfer")

    @staticmethod
    def vllm_kv_interleaved(kv_caches, *, fp8: Optional[bool] = None) -> "PagedLayout":
        """vLLM's current (2026) per-layer cache ``[NB, H, BS, 2*D]`` (logical dims; any stride
        permutation with a dense last dim): K is ``[..., :D]`` and V ``[..., D:]`` of each
        token-head, handed over as non-contiguous views. For pre-split views use
        ``from_tensors(k_views, v_views, order="HND")``."""
        ts = _tensors("kv_caches", kv_caches)
        if ts[0].dim() != 4 or ts[0].shape[-1] % 2:
            raise ValueError(f"kv_caches: expected per-layer [NB, H, BS, 2*D], got {tuple(ts[0].shape)}")
        D = ts[0].shape[-1] // 2
        return PagedLayout.from_tensors([t[..., :D] for t in ts], [t[..., D:] for t in ts], order="HND",
                                        engine="vllm_kv_interleaved", fp8=fp8)

    @staticmethod
    def vllm_legacy(key_caches, value_caches, *, fp8: Optional[bool] = None) -> "PagedLayout":
        """vLLM's legacy paged-attention layout: K ``[NB, H, D/x, BS, x]`` (x = 16 bytes / element
        size, read from the shape), V ``[NB, H, D, BS]``, one of each per layer."""
        ks, vs = _tensors("key_caches", key_caches), _tensors("value_caches", value_caches)
        _same("key_caches", ks)
        _same("value_caches", vs)
        if len(ks) != len(vs):
            raise ValueError(f"value_caches: expected {len(ks)} layers like key_caches, got {len(vs)}")
        k, v = ks[0], vs[0]
        if k.dim() != 5:
            raise ValueError(f"key_caches: expected per-layer [NB, H, D/x, BS, x], got {tuple(k.shape)}")
        if v.dim() != 4:
            raise ValueError(f"value_caches: expected per-layer [NB, H, D, BS], got {tuple(v.shape)}")
        NB, H, DX, BS, x = k.shape
        D = DX * x
        if tuple(v.shape) != (NB, H, D, BS):
            raise ValueError(f"value_caches: expected shape {(NB, H, D, BS)} to match key_caches, got {tuple(v.shape)}")
        kb, kh, kdx, kt, kdi = k.stride()
        vb, vh, vd, vt = v.stride()
        return PagedLayout.from_strided("vllm_legacy", ks + vs, len(ks), 2, NB, BS, H, D,
                                        [(kb, kt, kh, kdx, kdi), (vb, vt, vh, x * vd, vd)], x=x, fp8=fp8)

    @staticmethod
    def cross_layer(cache: torch.Tensor, order: str = "NHD", *, fp8: Optional[bool] = None) -> "PagedLayout":
        """One tensor for all layers: ``[NB, L, 2, BS, H, D]`` (``order="HND"``:
        ``[NB, L, 2, H, BS, D]``), a block holding every layer's K and V."""
        if not isinstance(cache, torch.Tensor):
            raise TypeError(f"cache: expected a torch.Tensor, got {type(cache).__name__}")
        if cache.dim() != 6 or cache.shape[2] != 2:
            raise ValueError(f"cache: expected [NB, L, 2, BS, H, D] (or HND), got {tuple(cache.shape)}")
        L = cache.shape[1]
        ks = [cache[:, l, 0] for l in range(L)]
        vs = [cache[:, l, 1] for l in range(L)]
        return PagedLayout.from_tensors(ks, vs, order=order, engine="cross_layer", fp8=fp8)

    @staticmethod
    def sglang(k_buffers, v_buffers, *, page_size: int = 1, fp8: Optional[bool] = None) -> "PagedLayout":
        """SGLang's token pool: per layer ``k_buffer[l]``, ``v_buffer[l]`` of ``[size, H, D]``
        (slot = token index; slot 0 is SGLang's padding dummy: its writes land there, as in
        SGLang). fp8 pools are uint8 (``fp8`` defaults to True for uint8). ``page_size`` groups
        ``page_size`` consecutive slots into a block (for page tables); ``size`` must be a
        multiple of it."""
        ks, vs = _tensors("k_buffers", k_buffers), _tensors("v_buffers", v_buffers)
        for name, g in (("k_buffers", ks), ("v_buffers", vs)):
            _same(name, g)
            if g[0].dim() != 3:
                raise ValueError(f"{name}: expected per-layer [size, H, D], got {tuple(g[0].shape)}")
        if len(ks) != len(vs) or ks[0].shape != vs[0].shape:
            raise ValueError("v_buffers: expected as many layers and the same [size, H, D] as k_buffers")
        size, H, D = ks[0].shape
        if page_size < 1 or size % page_size:
            raise ValueError(f"page_size: expected a positive divisor of the pool size {size}, got {page_size}")
        st = [(g[0].stride(0) * page_size, g[0].stride(0), g[0].stride(1), 0, g[0].stride(2)) for g in (ks, vs)]
        return PagedLayout.from_strided("sglang", ks + vs, len(ks), 2, size // page_size, page_size, H, D, st, fp8=fp8)

    @staticmethod
    def sglang_mla(kv_buffers, *, page_size: int = 1, fp8: Optional[bool] = None) -> "PagedLayout":
        """SGLang's MLA pool: per layer ``[size, 1, kv_lora_rank + rope_dim]`` (one latent cache)."""
        ts = _tensors("kv_buffers", kv_buffers)
        _same("kv_buffers", ts)
        if ts[0].dim() != 3:
            raise ValueError(f"kv_buffers: expected per-layer [size, 1, D], got {tuple(ts[0].shape)}")
        size, H, D = ts[0].shape
        if page_size < 1 or size % page_size:
            raise ValueError(f"page_size: expected a positive divisor of the pool size {size}, got {page_size}")
        s = ts[0].stride()
        return PagedLayout.from_strided("sglang_mla", ts, len(ts), 1, size // page_size, page_size, H, D,
                                        [(s[0] * page_size, s[0], s[1], 0, s[2])], fp8=fp8)

    @staticmethod
    def mla(kv_caches, *, fp8: Optional[bool] = None) -> "PagedLayout":
        """vLLM MLA: per layer ``[NB, BS, kv_lora_rank + rope_dim]`` (e.g. 512 + 64), one latent
        cache (``num_kv = 1``, one head)."""
        ts = _tensors("kv_caches", kv_caches)
        if ts[0].dim() != 3:
            raise ValueError(f"kv_caches: expected per-layer [NB, BS, D], got {tuple(ts[0].shape)}")
        lay = PagedLayout.from_tensors(ts, None, engine="mla", fp8=fp8)
        return lay


# ---- addressing -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PageTable:
    """FlashInfer's CSR page table for a batch of B sequences (all int32, on the caches' device):
    ``kv_indptr [B+1]``, ``kv_indices [kv_indptr[B]]`` (block ids), ``kv_last_page_len [B]``
    (tokens in each sequence's last page, 1..BS). The flat side holds the sequences' tokens
    back to back: sequence b has ``(pages_b - 1) * BS + last_b`` tokens (0 without pages)."""

    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    kv_last_page_len: torch.Tensor


def page_table_slots(table: PageTable, block_size: int, num_tokens: int) -> torch.Tensor:
    """int64 ``slot_mapping [num_tokens]`` of a page table, computed on the device (no host sync,
    CUDA-graph capturable). Flat tokens past the table's last token get slot -1 (skipped);
    a page index outside ``kv_indices`` gives slot 2^62 (out of range: skipped and counted)."""
    indptr = table.kv_indptr.to(torch.int64)
    last = table.kv_last_page_len.to(torch.int64)
    npages = indptr[1:] - indptr[:-1]
    ntok = torch.where(npages > 0, (npages - 1) * block_size + last, torch.zeros_like(npages))
    tok_ptr = torch.cat([torch.zeros(1, dtype=torch.int64, device=indptr.device), torch.cumsum(ntok, 0)])
    i = torch.arange(num_tokens, dtype=torch.int64, device=indptr.device)
    b = (torch.searchsorted(tok_ptr, i, right=True) - 1).clamp_(0, max(npages.numel() - 1, 0))
    j = i - tok_ptr[b]
    pi = indptr[b] + j // block_size
    nidx = table.kv_indices.numel()
    inside = (pi >= 0) & (pi < nidx) & (j < ntok[b])
    page = table.kv_indices.to(torch.int64)[pi.clamp(0, max(nidx - 1, 0))] if nidx else torch.zeros_like(pi)
    slot = page * block_size + j % block_size
    bad = torch.full_like(slot, 1 << 62)
    past = i >= tok_ptr[-1]
    slot = torch.where(inside, slot, bad)
    slot = torch.where(past, torch.full_like(slot, -1), slot)
    # a negative page id is out of range too (a negative slot would mean "skip" silently)
    return torch.where((~past) & (page < 0), bad, slot)
