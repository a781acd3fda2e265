"""Bench cases, one module per op family; ``CASES`` maps each op name to its runner."""
from . import codec, quant

CASES = {**quant.CASES, **codec.CASES}
