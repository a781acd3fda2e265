"""Quantization formats (a format is a value: hashable, printable, parseable).

See ``docs/quant-spec.md`` for the math. A :class:`QuantFormat` says how KV is turned into
codes; :class:`QuantizedKV` holds the codes with their scales and zero points.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import torch

INT_BITS = (8, 4, 2)
INT_AXES = ("channel", "token")
FP8_SCOPES = ("tensor", "head", "token_head")
FP8_MAX = 448.0
INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclasses.dataclass(frozen=True)
class QuantFormat:
    """How KV is quantized.

    ``kind="int"``: asymmetric integer codes of ``bits`` in {8, 4, 2}, one float32 scale and
    zero point per group of ``group_size`` elements, grouped along ``axis``:
    ``"channel"`` (consecutive channels of one token and head: per-token quantization) or
    ``"token"`` (consecutive tokens of one channel: per-channel, KIVI-style for keys).

    ``kind="fp8"``: float8 e4m3 codes with float32 scales per ``scope``: ``"tensor"`` (one per
    layer), ``"head"`` (per layer and head) or ``"token_head"`` (per layer, token and head).
    """

    kind: str
    bits: int = 8
    group_size: int = 0
    axis: str = "channel"
    scope: str = "token_head"

    def __post_init__(self):
        if self.kind == "int":
            if self.bits not in INT_BITS:
                raise ValueError(f"bits: expected one of {INT_BITS} for int formats, got {self.bits!r}")
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(f"group_size: expected a positive int, got {self.group_size!r}")
            if self.axis not in INT_AXES:
                raise ValueError(f"axis: expected one of {INT_AXES}, got {self.axis!r}")
        elif self.kind == "fp8":
            if self.bits != 8:
                raise ValueError(f"bits: fp8 formats have 8 bits, got {self.bits!r}")
            if self.scope not in FP8_SCOPES:
                raise ValueError(f"scope: expected one of {FP8_SCOPES}, got {self.scope!r}")
        else:
            raise ValueError(f"kind: expected 'int' or 'fp8', got {self.kind!r}")

    # ---- constructors -------------------------------------------------------------------
    @staticmethod
    def int(bits: int, group_size: int, axis: str = "channel") -> "QuantFormat":
        return QuantFormat("int", bits=bits, group_size=group_size, axis=axis)

    @staticmethod
    def fp8(scope: str = "token_head") -> "QuantFormat":
        return QuantFormat("fp8", bits=8, scope=scope)

    @staticmethod
    def parse(spec) -> "QuantFormat":
        """``"int4:g32:channel"``, ``"int2:g32:token"``, ``"fp8:token_head"``, ``"fp8"``."""
        if isinstance(spec, QuantFormat):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"format: expected a QuantFormat or a str like 'int4:g32:channel', got {type(spec).__name__}")
        parts = spec.strip().lower().split(":")
        head = parts[0]
        try:
            if head in ("fp8", "fp8_e4m3"):
                if len(parts) > 2:
                    raise ValueError
                return QuantFormat.fp8(parts[1] if len(parts) == 2 else "token_head")
            if head.startswith("int"):
                bits = int(head[3:])
                if len(parts) not in (2, 3) or not parts[1].startswith("g"):
                    raise ValueError
                g = int(parts[1][1:])
                return QuantFormat.int(bits, g, parts[2] if len(parts) == 3 else "channel")
        except ValueError as e:
            if str(e):
                raise ValueError(f"format {spec!r}: {e}") from None
        raise ValueError(
            f"format: cannot parse {spec!r}; expected 'int{{8,4,2}}:g<G>:{{channel,token}}' or "
            f"'fp8:{{tensor,head,token_head}}'")

    def __str__(self) -> str:
        if self.kind == "fp8":
            return f"fp8:{self.scope}"
        return f"int{self.bits}:g{self.group_size}:{self.axis}"

    # ---- derived ------------------------------------------------------------------------
    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def per_byte(self) -> int:
        """Codes per byte (1 for int8/fp8, 2 for int4, 4 for int2)."""
        return 8 // self.bits

    @property
    def has_zero(self) -> bool:
        return self.kind == "int"

    def codes_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self.kind == "fp8" else torch.uint8

    def codes_shape(self, L: int, T: int, H: int, D: int) -> Tuple[int, ...]:
        return (L, T, H, D // self.per_byte)

    def scale_shape(self, L: int, T: int, H: int, D: int) -> Tuple[int, ...]:
        if self.kind == "fp8":
            return {"tensor": (L,), "head": (L, H), "token_head": (L, T, H)}[self.scope]
        if self.axis == "channel":
            return (L, T, H, D // self.group_size)
        return (L, math.ceil(T / self.group_size), H, D)

    def check_shape(self, T: int, H: int, D: int) -> None:
        """Raise ValueError if this format cannot quantize a ``[.., T, H, D]`` tensor."""
        if D % self.per_byte:
            raise ValueError(f"x: head_dim {D} must be a multiple of {self.per_byte} for {self}")
        if self.kind == "int" and self.axis == "channel" and D % self.group_size:
            raise ValueError(f"format: group_size {self.group_size} must divide head_dim {D} for {self}")

    def bits_per_element(self, T: int, H: int, D: int, L: int = 1) -> float:
        """Stored bits per KV element, scales and zero points included."""
        n = L * T * H * D
        meta = math.prod(self.scale_shape(L, T, H, D)) * (2 if self.has_zero else 1) * 32
        return (n * self.bits + meta) / n


@dataclasses.dataclass
class QuantizedKV:
    """Quantized KV: ``codes`` with ``scale`` (and ``zero`` for int formats).

    * ``codes``: ``[L?, T, H, D * bits / 8]`` uint8 (int formats, sub-byte codes packed along
      D, first channel in the low bits) or ``[L?, T, H, D]`` float8_e4m3fn (fp8); contiguous.
    * ``scale``/``zero``: float32, shapes from :meth:`QuantFormat.scale_shape` (``L`` dropped
      when the input had no layer dim); ``zero`` is None for fp8.
    * ``format``: the :class:`QuantFormat`; ``dtype``: the input's dtype (dequantize's default).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: Optional[torch.Tensor]
    format: QuantFormat
    dtype: torch.dtype
    head_dim: int

    @property
    def has_layers(self) -> bool:
        return self.codes.dim() == 4

    @property
    def shape(self) -> Tuple[int, ...]:
        """Shape of the tensor these codes decode to."""
        return (*self.codes.shape[:-1], self.head_dim)

    @property
    def nbytes(self) -> int:
        n = self.codes.numel() * self.codes.element_size() + self.scale.numel() * 4
        return n + (self.zero.numel() * 4 if self.zero is not None else 0)

    def to(self, device) -> "QuantizedKV":
        z = self.zero.to(device) if self.zero is not None else None
        return dataclasses.replace(self, codes=self.codes.to(device), scale=self.scale.to(device), zero=z)
