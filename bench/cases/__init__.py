"""Bench cases, one module per op family; ``CASES`` maps each op name to its runner."""
from . import blend, codec, paged, quant

CASES = {**quant.CASES, **paged.CASES, **codec.CASES, **blend.CASES}
