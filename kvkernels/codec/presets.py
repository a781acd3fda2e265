"""Codec presets: KV values <-> symbols (torch, vectorised, any device).

A preset maps one (chunk, layer, kind) segment ``x`` float32 ``[S, N, C]`` (S segments of N
tokens, ``C = H * D`` channels) to symbols uint8 ``[S, N, C]`` plus float16 side info, and
back through the generic map of ``docs/codec-spec.md``::

    x[s, n, c] = lut[sym] * s_tok[s, n] * s_ch[s, c] + z_ch[s, c]

Modes (per kind, per layer ``bins`` and ``step``):

* ``token_sym``: CacheGen as released: ``M = bins // 2 - 1``, per-token ``amax`` over the
  channels, ``q = clamp(round(x * M / amax) + M, 0, 2M)``.
* ``channel_affine``: per-channel ``mean``/``std`` over the segment's tokens,
  ``Δ = step * std``, ``q = clamp(round((x - mean) / Δ) + bins // 2, 0, bins - 1)``.
* ``channel_delta``: per-channel ``zero`` (the mean) and step ``delta`` stored per segment;
  the encoder takes ``delta = max(base[c], max|x - zero| / (bins // 2 - 1))`` (never clamps),
  ``base`` from the model's Fisher step profile (``kvkernels/data/*.kvsteps.json``: rate-optimal
  steps ``sqrt(lam / F[c])``, capped at ``alpha * std[c]``), else ``step * std`` of the segment.

A kind may keep its first ``exact`` tokens (global positions ``0 .. exact-1``, the attention
sink) exactly: they are stored raw beside the coded streams (a post-pass after the generic map)
and replaced, for the quantizer, by the mean of their chunk's other tokens (:func:`neutralize`).

Presets are values (:class:`Preset`); their JSON config (``to_config``) is what a container
stores, and :meth:`Preset.from_config` validates one strictly (untrusted input).
"""
from __future__ import annotations

import json
import math
from dataclasses import replace, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

MODES = ("token_sym", "channel_affine", "channel_delta")
MAX_EXACT = 256
TABLE_MODES = ("chunk", "shared")
MAX_BINS = 256


class PresetError(ValueError):
    """A preset config that is malformed (the container turns it into a CodecError)."""


@dataclass(frozen=True)
class KindSpec:
    """How one kind (K or V) is quantized: ``mode`` and per-layer ``bins`` / ``step``."""

    mode: str
    bins: Tuple[int, ...]
    step: Tuple[float, ...] = ()
    exact: int = 0  # first tokens of the sequence stored exactly (the attention sink)
    # encoder only (not in the config): per-layer base steps float32 [C] of channel_delta
    ch_step: Optional[Tuple[torch.Tensor, ...]] = field(default=None, compare=False, hash=False, repr=False)

    def to_config(self) -> dict:
        d = {"mode": self.mode, "bins": list(self.bins)}
        if self.mode in ("channel_affine", "channel_delta"):
            d["step"] = [float(s) for s in self.step]
        if self.exact:
            d["exact"] = int(self.exact)
        return d

    @staticmethod
    def from_config(d, L: int) -> "KindSpec":
        if not isinstance(d, dict):
            raise PresetError("kind spec must be an object")
        mode = d.get("mode")
        if mode not in MODES:
            raise PresetError(f"unknown mode {mode!r}")
        bins = d.get("bins")
        if not isinstance(bins, list) or len(bins) != L:
            raise PresetError(f"bins must be a list of {L} integers")
        for b in bins:
            if type(b) is not int or not 2 <= b <= MAX_BINS:
                raise PresetError(f"bins entries must be integers in 2..{MAX_BINS}, got {b!r}")
            if mode in ("token_sym", "channel_delta") and b < 4:
                raise PresetError(f"{mode} needs bins >= 4")
        step: Tuple[float, ...] = ()
        if mode in ("channel_affine", "channel_delta"):
            st = d.get("step")
            if not isinstance(st, list) or len(st) != L:
                raise PresetError(f"step must be a list of {L} numbers")
            for s in st:
                if type(s) not in (int, float) or not (math.isfinite(s) and 1e-4 <= s <= 1e4):
                    raise PresetError(f"step entries must be finite numbers in [1e-4, 1e4], got {s!r}")
            step = tuple(float(s) for s in st)
        exact = d.get("exact", 0)
        if type(exact) is not int or not 0 <= exact <= MAX_EXACT or ("exact" in d and exact == 0):
            raise PresetError(f"exact must be an integer in 1..{MAX_EXACT} when present, got {exact!r}")
        extra = set(d) - {"mode", "bins", "step", "exact"}
        if extra:
            raise PresetError(f"unknown keys {sorted(extra)}")
        return KindSpec(mode, tuple(bins), step, exact)


@dataclass(frozen=True)
class Preset:
    """A named quantization recipe for ``L`` layers: one :class:`KindSpec` per kind + table mode."""

    name: str
    k: KindSpec
    v: KindSpec
    tables: str = "chunk"  # "chunk": per-chunk tables inline; "shared": a profiled bank by hash

    @property
    def n_layers(self) -> int:
        return len(self.k.bins)

    def kind(self, i: int) -> KindSpec:
        return self.k if i == 0 else self.v

    def bins_max(self) -> int:
        return max(max(self.k.bins), max(self.v.bins))

    def to_config(self) -> dict:
        return {"name": self.name, "k": self.k.to_config(), "v": self.v.to_config(), "tables": self.tables}

    def to_json(self) -> bytes:
        return json.dumps(self.to_config(), separators=(",", ":"), sort_keys=True).encode("utf-8")

    @staticmethod
    def from_config(d, L: int) -> "Preset":
        if not isinstance(d, dict):
            raise PresetError("preset config must be a JSON object")
        extra = set(d) - {"name", "k", "v", "tables"}
        if extra:
            raise PresetError(f"unknown keys {sorted(extra)}")
        name = d.get("name")
        if not isinstance(name, str) or not 0 < len(name) <= 64:
            raise PresetError("name must be a string of 1..64 characters")
        tables = d.get("tables")
        if tables not in TABLE_MODES:
            raise PresetError(f"tables must be one of {TABLE_MODES}")
        return Preset(name, KindSpec.from_config(d.get("k"), L), KindSpec.from_config(d.get("v"), L), tables)

    @staticmethod
    def from_json(b: bytes, L: int) -> "Preset":
        try:
            d = json.loads(b.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise PresetError(f"preset is not valid JSON: {e}") from None
        return Preset.from_config(d, L)


# ---------------------------------------------------------------------------------------------
# Symbols


def _f16(x: torch.Tensor) -> torch.Tensor:
    """Round to float16 (saturating to the finite range) and back to float32."""
    return x.clamp(-65504.0, 65504.0).to(torch.float16).to(torch.float32)


def quantize(x: torch.Tensor, spec: KindSpec, layer: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Symbols of segments ``x`` (float ``[S, N, C]``) for ``spec`` at ``layer``.

    Returns ``(sym uint8 [S, N, C], side)`` with ``side`` float16 tensors: ``amax [S, N]``
    (token_sym) or ``mean``, ``std [S, C]`` (channel_affine). NaN inputs are not supported
    (they give unspecified symbols).
    """
    x = x.to(torch.float32)
    bins = spec.bins[layer]
    if spec.mode == "token_sym":
        M = bins // 2 - 1
        amax = _f16(x.abs().amax(dim=2))  # [S, N]
        # fp16 rounding may round amax down a little: the clamp keeps q in range.
        scale = torch.where(amax > 0, M / amax.clamp_min(1e-30), torch.zeros_like(amax))
        q = torch.round(x * scale.unsqueeze(2)) + M
        q = q.clamp(0, 2 * M)
        return q.to(torch.uint8), {"amax": amax.to(torch.float16)}
    if spec.mode == "channel_affine":
        mean = _f16(x.mean(dim=1))  # [S, C]
        std = _f16(x.std(dim=1, unbiased=False)) if x.shape[1] > 1 else torch.zeros_like(mean)
        std = torch.nan_to_num(std)
        delta = std * spec.step[layer]
        center = bins // 2
        inv = torch.where(delta > 0, 1.0 / delta.clamp_min(1e-30), torch.zeros_like(delta))
        q = torch.round((x - mean.unsqueeze(1)) * inv.unsqueeze(1)) + center
        q = q.clamp(0, bins - 1)
        return q.to(torch.uint8), {"mean": mean.to(torch.float16), "std": std.to(torch.float16)}
    if spec.mode == "channel_delta":
        zero = _f16(x.mean(dim=1))  # [S, C]
        center = bins // 2
        dev = (x - zero.unsqueeze(1)).abs().amax(dim=1)  # [S, C]
        C = x.shape[2]
        base = None
        if spec.ch_step is not None and len(spec.ch_step) > layer and spec.ch_step[layer].numel() == C:
            base = spec.ch_step[layer].to(device=x.device, dtype=torch.float32).unsqueeze(0)
        if base is None:
            std = x.std(dim=1, unbiased=False) if x.shape[1] > 1 else torch.zeros_like(zero)
            base = std * spec.step[layer]
        d = torch.maximum(base.expand_as(dev), dev / (center - 1))
        # fp16 step rounded up so that |x - zero| / delta <= center - 1 still holds (no clamping)
        delta = _f16(d * (1.0 + 2.0 ** -10))
        delta = torch.where(torch.isfinite(delta), delta, torch.full_like(delta, 65504.0))
        inv = torch.where(delta > 0, 1.0 / delta.clamp_min(1e-30), torch.zeros_like(delta))
        q = torch.round((x - zero.unsqueeze(1)) * inv.unsqueeze(1)) + center
        q = q.clamp(0, bins - 1)
        return q.to(torch.uint8), {"zero": zero.to(torch.float16), "delta": delta.to(torch.float16)}
    raise PresetError(f"unknown mode {spec.mode!r}")


def neutralize(seg: torch.Tensor, e: int) -> torch.Tensor:
    """``seg`` float ``[N, C]`` with its first ``e`` (exact) tokens replaced by the mean of the
    others (0 when none): what the quantizer sees of exactly stored tokens, so the sink does
    not widen the chunk's statistics. Returns a new tensor when ``e > 0``."""
    if e <= 0:
        return seg
    seg = seg.clone()
    N = seg.shape[0]
    e = min(e, N)
    seg[:e] = seg[e:].mean(0, keepdim=True) if N > e else 0.0
    return seg


def side_names(spec: KindSpec) -> Tuple[Tuple[str, str], ...]:
    """(name, axis) of the side info a mode stores, in container order; axis 'n' or 'c'."""
    if spec.mode == "token_sym":
        return (("amax", "n"),)
    if spec.mode == "channel_delta":
        return (("zero", "c"), ("delta", "c"))
    return (("mean", "c"), ("std", "c"))


def lut_row(spec: KindSpec, layer: int, width: Optional[int] = None) -> torch.Tensor:
    """``lut`` float32 ``[width]`` (default ``bins``) of ``spec`` at ``layer`` (0 past bins)."""
    bins = spec.bins[layer]
    width = bins if width is None else width
    center = bins // 2 - 1 if spec.mode == "token_sym" else bins // 2
    row = torch.zeros(width, dtype=torch.float32)
    row[:bins] = torch.arange(bins, dtype=torch.float32) - center
    return row


def dequant_params(spec: KindSpec, layer: int, side: Dict[str, torch.Tensor]):
    """``(s_tok [S, N] | None, s_ch [S, C] | None, z_ch [S, C] | None)`` float32 of the map."""
    if spec.mode == "token_sym":
        M = spec.bins[layer] // 2 - 1
        return side["amax"].to(torch.float32) / M, None, None
    if spec.mode == "channel_delta":
        return None, side["delta"].to(torch.float32), side["zero"].to(torch.float32)
    std = side["std"].to(torch.float32)
    return None, std * spec.step[layer], side["mean"].to(torch.float32)


def dequantize(sym: torch.Tensor, spec: KindSpec, layer: int, side: Dict[str, torch.Tensor]) -> torch.Tensor:
    """float32 ``[S, N, C]`` from symbols uint8 ``[S, N, C]`` and ``side`` (the generic map)."""
    lut = lut_row(spec, layer, MAX_BINS).to(sym.device)
    x = lut[sym.long()]
    s_tok, s_ch, z_ch = dequant_params(spec, layer, side)
    if s_tok is not None:
        x = x * s_tok.unsqueeze(2)
    if s_ch is not None:
        x = x * s_ch.unsqueeze(1)
    if z_ch is not None:
        x = x + z_ch.unsqueeze(1)
    return x


def fake_quant_layer(x: torch.Tensor, spec: KindSpec, layer: int, chunk_tokens: int) -> torch.Tensor:
    """Quantize then dequantize one layer's kind ``x`` float ``[T, C]`` (tokens from position 0)
    chunk by chunk: exactly what ``decode`` returns (exact tokens included) in float32."""
    T, C = x.shape
    out = torch.empty(T, C, dtype=torch.float32, device=x.device)
    if spec.exact:
        raw = x
        x = x.to(torch.float32).clone()
        for t0 in range(0, min(spec.exact, T), chunk_tokens):
            t1 = min(T, t0 + chunk_tokens)
            x[t0:t1] = neutralize(x[t0:t1], spec.exact - t0)
        y = fake_quant_layer(x, KindSpec(spec.mode, spec.bins, spec.step, 0, spec.ch_step), layer, chunk_tokens)
        e = min(spec.exact, T)
        y[:e] = raw[:e].to(torch.float32)
        return y
    nf = T // chunk_tokens
    if nf:
        seg = x[: nf * chunk_tokens].reshape(nf, chunk_tokens, C)
        sym, side = quantize(seg, spec, layer)
        out[: nf * chunk_tokens] = dequantize(sym, spec, layer, side).reshape(-1, C)
    if T > nf * chunk_tokens:
        seg = x[nf * chunk_tokens:].unsqueeze(0)
        sym, side = quantize(seg, spec, layer)
        out[nf * chunk_tokens:] = dequantize(sym, spec, layer, side)[0]
    return out


# ---------------------------------------------------------------------------------------------
# Named presets


def cachegen(L: int) -> Preset:
    """CacheGen as released: token_sym; K 32 bins in layers 0-9, 16 after; V 32 in 0-1, 16 after."""
    kb = tuple(32 if l < 10 else 16 for l in range(L))
    vb = tuple(32 if l < 2 else 16 for l in range(L))
    return Preset("cachegen", KindSpec("token_sym", kb), KindSpec("token_sym", vb), "chunk")


# The default's parameters (chosen by measurement on SmolLM2-135M, docs/codec-quality.md):
# per-layer steps from a sensitivity profile (perplexity change of quantizing one (kind, layer)
# alone at step 1.0), allocated so that every (kind, layer) adds the same expected distortion
# (step^2 * sensitivity constant: the rate-optimal split for an entropy-coded uniform
# quantizer); bins cover +-8 steps... of std (so outliers are not clamped).
DEFAULT_TARGET = 1.2      # the steps' nominal total perplexity budget (%); the measured change is larger (docs)
DEFAULT_STEP = 0.35       # for models without a profile
MIN_SENS = 0.15
MIN_STEP = 2 * 8.0 / 256  # 256 bins still cover +-8 std (finer steps clamp outliers: measured worse)
COVER_STD = 8.0


def _profile(model: str):
    from pathlib import Path

    if not model:
        return None
    p = Path(__file__).resolve().parent.parent / "data" / "codec-profiles.json"
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return d.get(model)


def steps_from_sensitivity(sens: Sequence[float], n_items: int, target: float = DEFAULT_TARGET) -> List[float]:
    """Per-layer steps giving each of ``n_items`` (kind, layer) an equal share of ``target``."""
    share = target / n_items
    return [float(min(1.0, max(MIN_STEP, math.sqrt(share / max(s, MIN_SENS))))) for s in sens]


def bins_for(step: float) -> int:
    """Bins (even, 16..256) covering +-COVER_STD standard deviations at ``step``."""
    b = 2 * math.ceil(COVER_STD / step)
    return int(min(256, max(16, b)))


def default(L: int, k_step: float = None, v_step: float = None, bins=None, tables: str = "shared", *,
            steps=None, model: str = "", scale: float = 1.0, target: float = None) -> Preset:
    """``affine_v1`` (the default before the Fisher study; named "default" when built directly):
    channel_affine K and V (per-chunk, per-channel mean/std), shared tables.

    Steps: ``steps=(k_list, v_list)``, else a uniform ``k_step``/``v_step``, else the model's
    sensitivity profile (``kvkernels/data/codec-profiles.json``), else ``DEFAULT_STEP``; all
    times ``scale``. ``bins``: an int, ``(k_list, v_list)``, or None (cover +-8 std).
    """
    prof = _profile(model) if steps is None and k_step is None and v_step is None else None
    if steps is not None:
        ks, vs = list(steps[0]), list(steps[1])
    elif prof is not None and len(prof["k"]) == L:
        t = DEFAULT_TARGET if target is None else target
        ks = steps_from_sensitivity(prof["k"], 2 * L, t)
        vs = steps_from_sensitivity(prof["v"], 2 * L, t)
    else:
        ks = [DEFAULT_STEP if k_step is None else k_step] * L
        vs = [DEFAULT_STEP if v_step is None else v_step] * L
    ks = [round(s * scale, 5) for s in ks]
    vs = [round(s * scale, 5) for s in vs]
    if bins is None:
        kb, vb = [bins_for(s) for s in ks], [bins_for(s) for s in vs]
    elif isinstance(bins, int):
        kb, vb = [bins] * L, [bins] * L
    else:
        kb, vb = list(bins[0]), list(bins[1])
    k = KindSpec("channel_affine", tuple(kb), tuple(float(s) for s in ks))
    v = KindSpec("channel_affine", tuple(vb), tuple(float(s) for s in vs))
    return Preset("default", k, v, tables)


# ---------------------------------------------------------------------------------------------
# Fisher-allocated steps (the default since the second quality study, docs/codec-quality.md)
#
# The perplexity cost of independent quantization noise d[t, c] in the cache is, to second
# order, mean-NLL change ~= 1/2 sum_c Fbar[c] E[d^2] with Fbar the per-token diagonal Fisher
# information of the cached element (profiled once per model). An entropy-coded uniform
# quantizer of step s costs ~ h - log2(s) bits for E[d^2] = s^2/12, so the rate-optimal steps
# are s[c] = sqrt(lam / Fbar[c]) for one global lam (every kind, layer and channel), capped at
# alpha * std[c] (coarser steps turn the error into a dropped, structured signal: measured
# far worse than the model predicts). The attention sink (token 0, ~10^4 x the median token's
# Fisher) is stored exactly.

FISHER_LAM = 7e-6
FISHER_ALPHA = 1.0
FISHER_EXACT = 1


def _b64_f32(s: str, n: int) -> torch.Tensor:
    import base64

    import numpy as np

    b = base64.b64decode(s)
    if len(b) != 4 * n:
        raise ValueError("step profile: array size mismatch")
    return torch.from_numpy(np.frombuffer(b, dtype="<f4").copy())


_STEP_PROFILES: Dict[str, Optional[dict]] = {}


def step_profile(model: str) -> Optional[dict]:
    """The bundled Fisher profile of ``model`` (``kvkernels/data/*.kvsteps.json``): ``fisher``,
    ``std``, ``dev`` float32 ``[2, L, C]`` (or None)."""
    from pathlib import Path

    if not model:
        return None
    if model in _STEP_PROFILES:
        return _STEP_PROFILES[model]
    found = None
    for p in sorted((Path(__file__).resolve().parent.parent / "data").glob("*.kvsteps.json")):
        try:
            d = json.loads(p.read_text())
            if d.get("model") != model:
                continue
            shape = tuple(int(v) for v in d["shape"])
            n = shape[0] * shape[1] * shape[2]
            found = {k: _b64_f32(d[k], n).reshape(shape) for k in ("fisher", "std", "dev")}
            found["chunk"] = int(d.get("chunk", 256))
            break
        except (OSError, ValueError, KeyError, TypeError):
            continue
    _STEP_PROFILES[model] = found
    return found


def fisher_steps(prof: dict, lam: float, alpha: float) -> torch.Tensor:
    """Base steps float32 ``[2, L, C]``: ``min(sqrt(lam / fisher), alpha * std)``."""
    F = prof["fisher"].clamp_min(1e-20)
    s = torch.sqrt(lam / F)
    return torch.minimum(s, alpha * prof["std"]).clamp_min(1e-6)


def fisher(L: int, *, model: str = "", lam: float = FISHER_LAM, alpha: float = FISHER_ALPHA,
           exact: int = FISHER_EXACT, tables: str = "shared", name: str = "default") -> Preset:
    """channel_delta K and V with Fisher-allocated per-channel steps; first ``exact`` tokens exact.

    Without a step profile for ``model`` (or for another layer count): the ``affine_v1`` kinds
    (channel_affine, per-chunk per-channel mean / std) with the exact sink token(s): 6.7
    bits/element on KV-like Llama-3-8B-shape data where channel_delta with std-relative steps and
    64 bins took 7.8 at the same error (docs/codec-quality.md, "Models without a profile").
    """
    prof = step_profile(model)
    if prof is None or prof["fisher"].shape[1] != L:
        p = default(L, model=model)  # + the exact sink token(s), as with a profile
        return Preset(name, replace(p.k, exact=exact), replace(p.v, exact=exact), p.tables)
    base = fisher_steps(prof, lam, alpha)
    kinds = []
    for k in range(2):
        bins, step = [], []
        for l in range(L):
            r = prof["dev"][k, l] / base[k, l]  # deviations in steps of a typical chunk
            b = 2 * math.ceil(float(torch.quantile(r, 0.99)) + 1)
            bins.append(int(min(MAX_BINS, max(4, b))))
            step.append(round(float((base[k, l] / prof["std"][k, l].clamp_min(1e-12)).median()), 5))
        kinds.append(KindSpec("channel_delta", tuple(bins), tuple(min(1e4, max(1e-4, v)) for v in step), exact,
                              tuple(base[k, l].contiguous() for l in range(L))))
    return Preset(name, kinds[0], kinds[1], tables)


def affine_v1(L: int, model: str = "") -> Preset:
    """The previous default (channel_affine, sensitivity-profiled per-layer steps), for comparison."""
    p = default(L, model=model)
    return Preset("affine_v1", p.k, p.v, p.tables)


NAMED = {"cachegen": cachegen, "default": fisher, "affine_v1": affine_v1}


def get(preset, L: int, model: str = "") -> Preset:
    """A :class:`Preset` for ``L`` layers from a name or a Preset (checked against ``L``)."""
    if isinstance(preset, Preset):
        if preset.n_layers != L:
            raise ValueError(f"preset {preset.name!r} is for {preset.n_layers} layers, the KV has {L}")
        Preset.from_config(preset.to_config(), L)  # validate
        return preset
    if not isinstance(preset, str):
        raise TypeError(f"preset must be a name or a Preset, got {type(preset).__name__}")
    if preset not in NAMED:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(NAMED)}")
    if preset == "cachegen":
        return cachegen(L)
    return NAMED[preset](L, model=model)
