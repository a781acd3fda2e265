"""bench.report: the README table and the below-target listing from bench JSON rows."""
from bench.report import below, table


def _row(op, fmt, backend, nbytes, pct, status="ran"):
    return dict(op=op, format=fmt, backend=backend, model="m", L=2, T=64, H=1, D=64, bytes=nbytes,
                GBps=pct * 40, copy_GBps=4000.0, pct_copy=pct, mix_GBps=None, status=status, gpu="G",
                torch="t", triton="tr", cuda="c", date="d")


def test_below_counts_only_large_rows_that_ran():
    mib = 2**20
    rows = [_row("quantize", "int8:g64:channel", "cuda", 100 * mib, 95.0),
            _row("quantize", "fp8:tensor", "cuda", 100 * mib, 58.5),
            _row("dequantize", "int2:g32:token", "triton", 64 * mib, 89.99),
            _row("dequantize", "int2:g32:token", "cuda", 63 * mib, 50.0),          # below the size
            _row("dequantize", "int4:g32:token", "cuda", 100 * mib, 10.0, "skipped")]
    out = below(rows, 90).splitlines()
    assert out[0] == "1 of 3 rows of >= 64 MiB at >= 90% of copy"
    assert len(out) == 3 and "fp8:tensor" in out[1] and "58.50%" in out[1] and "89.99%" in out[2]
    assert below(rows, 50).splitlines()[0] == "3 of 3 rows of >= 64 MiB at >= 50% of copy"


def test_table_has_a_row_per_case_and_backend_column():
    rows = [_row("quantize", "fp8:tensor", "cuda", 2**20, 91.0), _row("quantize", "fp8:tensor", "triton", 2**20, 60.0)]
    t = table(rows).splitlines()
    assert "cuda GB/s (% copy)" in t[2] and "triton GB/s (% copy)" in t[2]
    assert t[4].startswith("| `quantize` | `fp8:tensor` |") and "(91%)" in t[4] and "(60%)" in t[4]
