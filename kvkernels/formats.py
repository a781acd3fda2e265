"""Quantization formats (a format is a value: hashable, printable, parseable).

See ``docs/quant-spec.md`` for the math. A :class:`QuantFormat` says how KV is turned into
codes; :class:`QuantizedKV` holds the codes with their scales and zero points.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Optional, Tuple

import torch

INT_BITS = (8, 4, 2)
INT_AXES = ("channel", "token")
FP8_SCOPES = ("tensor", "head", "token_head")
FP8_MAX = 448.0
INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# Largest group size a format may name. Channel groups must divide head_dim (64-256 in practice)
# and token groups of the literature are 32-128 tokens (KIVI); 2**16 leaves a wide margin for
# both, keeps a group's element count (G * head_dim, or G * H * D for a token group of one layer)
# far inside the 32-bit index arithmetic of the kernels, and bounds the work a kernel spends on
# one group however few tokens the input has. Larger values are refused where the format is
# built (and so where it is parsed), naming group_size, instead of failing deep inside torch or
# a kernel.
MAX_GROUP_SIZE = 2**16

_BITS_RE = re.compile(r"int([0-9]+)", re.ASCII)
_GROUP_RE = re.compile(r"g([1-9][0-9]*|0)", re.ASCII)
_FP8_HEADS = ("fp8", "fp8_e4m3")
GRAMMAR = ("'int{8,4,2}:g<G>[:{channel,token}]' (G a decimal 1..%d, no sign or leading zeros; axis "
           "default channel) or 'fp8[:{tensor,head,token_head}]' (scope default token_head), lowercase "
           "ASCII, no spaces" % MAX_GROUP_SIZE)


def _as_int(name: str, v) -> int:
    """An integer field: a Python int or numpy integer (normalised to int); bool, float, str or
    a tensor raise TypeError naming the field."""
    if isinstance(v, bool) or type(v).__name__ == "bool_" or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__} {v!r}")
    return int(v)


def _as_choice(name: str, v, choices) -> str:
    if not isinstance(v, str):
        raise TypeError(f"{name}: expected a str, one of {choices}, got {type(v).__name__} {v!r}")
    if v not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {v!r}")
    return v


@dataclasses.dataclass(frozen=True)
class QuantFormat:
    """How KV is quantized.

    ``kind="int"``: asymmetric integer codes of ``bits`` in {8, 4, 2}, one float32 scale and
    zero point per group of ``group_size`` elements (1..``MAX_GROUP_SIZE``), grouped along
    ``axis``: ``"channel"`` (consecutive channels of one token and head: per-token
    quantization) or ``"token"`` (consecutive tokens of one channel: per-channel, KIVI-style for
    keys).

    ``kind="fp8"``: float8 e4m3 codes with float32 scales per ``scope``: ``"tensor"`` (one per
    layer), ``"head"`` (per layer and head) or ``"token_head"`` (per layer, token and head).

    Fields a kind does not use must keep their defaults (fp8: ``bits=8``, ``group_size=0``,
    ``axis="channel"``; int: ``scope="token_head"``), so that equal formats compare equal and
    ``QuantFormat.parse(str(f)) == f``. Integer fields accept Python and numpy integers (stored
    as int); anything else (bool, float, str) raises ``TypeError`` naming the field.
    """

    kind: str
    bits: int = 8
    group_size: int = 0
    axis: str = "channel"
    scope: str = "token_head"

    def __post_init__(self):
        kind = _as_choice("kind", self.kind, ("int", "fp8"))
        bits = _as_int("bits", self.bits)
        group_size = _as_int("group_size", self.group_size)
        if not isinstance(self.axis, str):
            raise TypeError(f"axis: expected a str, one of {INT_AXES}, got {type(self.axis).__name__}")
        if not isinstance(self.scope, str):
            raise TypeError(f"scope: expected a str, one of {FP8_SCOPES}, got {type(self.scope).__name__}")
        if kind == "int":
            if bits not in INT_BITS:
                raise ValueError(f"bits: expected one of {INT_BITS} for int formats, got {bits!r}")
            if not 1 <= group_size <= MAX_GROUP_SIZE:
                raise ValueError(f"group_size: expected an int in 1..{MAX_GROUP_SIZE} (MAX_GROUP_SIZE), "
                                 f"got {group_size!r}")
            _as_choice("axis", self.axis, INT_AXES)
            if self.scope != "token_head":
                raise ValueError(f"scope: int formats have no scope (group along axis instead); got {self.scope!r}")
        else:
            if bits != 8:
                raise ValueError(f"bits: fp8 formats have 8 bits, got {bits!r}")
            if group_size != 0:
                raise ValueError(f"group_size: fp8 formats have no group size (use scope); got {group_size!r}")
            if self.axis != "channel":
                raise ValueError(f"axis: fp8 formats have no axis (use scope); got {self.axis!r}")
            _as_choice("scope", self.scope, FP8_SCOPES)
        object.__setattr__(self, "bits", bits)
        object.__setattr__(self, "group_size", group_size)

    # ---- constructors -------------------------------------------------------------------
    @staticmethod
    def int(bits: int, group_size: int, axis: str = "channel") -> "QuantFormat":
        return QuantFormat("int", bits=bits, group_size=group_size, axis=axis)

    @staticmethod
    def fp8(scope: str = "token_head") -> "QuantFormat":
        return QuantFormat("fp8", bits=8, scope=scope)

    @staticmethod
    def parse(spec) -> "QuantFormat":
        """Parse a format string; a :class:`QuantFormat` is returned as is.

        Grammar (strict, lowercase ASCII, no spaces)::

            format := int | fp8
            int    := "int" BITS ":g" G [":" AXIS]      BITS in 8, 4, 2; AXIS channel (default) | token
            fp8    := ("fp8" | "fp8_e4m3") [":" SCOPE]   SCOPE tensor | head | token_head (default)
            G      := [1-9][0-9]*                         at most MAX_GROUP_SIZE

        e.g. ``"int4:g32:channel"``, ``"int2:g32:token"``, ``"fp8:token_head"``, ``"fp8"``.
        ``parse(str(f)) == f`` for every format. A malformed field raises ``ValueError`` naming
        it (``bits``, ``group_size``, ``axis``, ``scope``), anything else naming ``format``."""
        if isinstance(spec, QuantFormat):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"format: expected a QuantFormat or a str like 'int4:g32:channel', got {type(spec).__name__}")
        parts = spec.split(":")
        head = parts[0]

        def bad(field: str, what: str):
            return ValueError(f"{field}: {what} in format {spec!r}; expected {GRAMMAR}")

        if head in _FP8_HEADS:
            if len(parts) > 2:
                raise bad("format", "fp8 formats have one field after the kind (the scope)")
            scope = parts[1] if len(parts) == 2 else "token_head"
            if scope not in FP8_SCOPES:
                raise bad("scope", f"expected one of {FP8_SCOPES}, got {scope!r}")
            return QuantFormat.fp8(scope)
        if head.startswith("int"):
            m = _BITS_RE.fullmatch(head)
            if m is None:
                raise bad("bits", f"expected ASCII digits after 'int', got {head[3:]!r}")
            if m.group(1) not in ("8", "4", "2"):
                raise bad("bits", f"expected one of {INT_BITS}, got {m.group(1)}")
            bits = int(m.group(1))
            if len(parts) not in (2, 3):
                raise bad("format", "int formats have two or three fields (int<bits>:g<group>[:axis])")
            m = _GROUP_RE.fullmatch(parts[1])
            if m is None:
                raise bad("group_size", f"expected 'g' and a decimal without sign or leading zeros, got {parts[1]!r}")
            g = int(m.group(1)) if len(m.group(1)) <= 12 else MAX_GROUP_SIZE + 1  # (int() of huge strings)
            if not 1 <= g <= MAX_GROUP_SIZE:
                raise bad("group_size", f"expected 1..{MAX_GROUP_SIZE} (MAX_GROUP_SIZE), got {g}")
            axis = parts[2] if len(parts) == 3 else "channel"
            if axis not in INT_AXES:
                raise bad("axis", f"expected one of {INT_AXES}, got {axis!r}")
            return QuantFormat.int(bits, g, axis)
        raise bad("format", "cannot parse it")

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

    def check_shape(self, T: int, H: int, D: int, name: str = "x") -> None:
        """Raise ValueError if this format cannot quantize a ``[.., T, H, D]`` tensor (``name``:
        the tensor's argument name in the message)."""
        if D % self.per_byte:
            raise ValueError(f"{name}: head_dim {D} must be a multiple of {self.per_byte} for {self}")
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
      when the input had no layer dim); contiguous; ``zero`` is None for fp8.
    * ``format``: the :class:`QuantFormat` (a format string is parsed); ``dtype``: the input's
      dtype (dequantize's default); ``head_dim``: ``D`` (a positive int).

    Validated on construction (and again by :func:`kvkernels.dequantize`, since fields may be
    reassigned): a wrong field raises ``TypeError``/``ValueError`` naming it.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: Optional[torch.Tensor]
    format: QuantFormat
    dtype: torch.dtype
    head_dim: int

    def __post_init__(self):
        if isinstance(self.format, str):
            self.format = QuantFormat.parse(self.format)
        if isinstance(self.head_dim, numbers.Integral) and not isinstance(self.head_dim, bool):
            self.head_dim = int(self.head_dim)
        self.validate()

    def validate(self, prefix: str = "") -> None:
        """Check every field against the others (metadata only); raise naming the field
        (``prefix`` is prepended to the names, e.g. ``"q."``)."""
        from ._validate import check_none, check_tensor

        fmt = self.format
        if not isinstance(fmt, QuantFormat):
            raise TypeError(f"{prefix}format: expected a QuantFormat or a format string, got {type(fmt).__name__}")
        if not isinstance(self.dtype, torch.dtype) or self.dtype not in INPUT_DTYPES:
            raise TypeError(f"{prefix}dtype: expected one of {[str(d) for d in INPUT_DTYPES]}, got {self.dtype!r}")
        D = self.head_dim
        if isinstance(D, bool) or not isinstance(D, numbers.Integral):
            raise TypeError(f"{prefix}head_dim: expected an int, got {type(D).__name__} {D!r}")
        if D < 1:
            raise ValueError(f"{prefix}head_dim: expected a positive int, got {D!r}")
        c = self.codes
        check_tensor(prefix + "codes", c, dtype=fmt.codes_dtype(), dim=(3, 4), contiguous=True)
        c4 = c.shape if c.dim() == 4 else (1, *c.shape)
        L, T, H, Dp = c4
        if D * fmt.bits != Dp * 8:
            raise ValueError(f"{prefix}codes: last dim {Dp} does not match head_dim {D} at {fmt.bits} bits "
                             f"(expected {D * fmt.bits // 8 if D * fmt.bits % 8 == 0 else D * fmt.bits / 8})")
        fmt.check_shape(T, H, D, name=prefix + "head_dim")
        sshape = fmt.scale_shape(L, T, H, D)
        pub = sshape if c.dim() == 4 else sshape[1:]
        check_tensor(prefix + "scale", self.scale, dtype=torch.float32, device=c.device, shape=pub, contiguous=True)
        if fmt.has_zero:
            check_tensor(prefix + "zero", self.zero, dtype=torch.float32, device=c.device, shape=pub, contiguous=True)
        else:
            check_none(prefix + "zero", self.zero, f"{fmt} has no zero point")

    @classmethod
    def _unchecked(cls, codes, scale, zero, format, dtype, head_dim) -> "QuantizedKV":
        """Build without :meth:`validate`: only for buffers that ``quantize`` allocated itself
        from a validated input (their shapes follow from the format by construction)."""
        if torch.compiler.is_compiling():  # dynamo (torch 2.11) cannot trace __new__ + __dict__.update
            return cls(codes, scale, zero, format, dtype, head_dim)
        q = cls.__new__(cls)
        q.__dict__.update(codes=codes, scale=scale, zero=zero, format=format, dtype=dtype, head_dim=head_dim)
        return q

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
