"""Bench cases, one module per op family; ``CASES`` maps each op name to its runner."""
from . import blend, quant

CASES = {**quant.CASES, **blend.CASES}
