"""Regenerate the README's measured tables from committed results.

    python scripts/update_readme.py bench/results/<gpu-run>.json docs/model-quality.md \
        [--paged bench/results/paged-<run>.json ...]

Replaces the blocks between <!-- BENCH --> / <!-- /BENCH --> and <!-- QUALITY --> / <!-- /QUALITY -->,
and with --paged the one between <!-- PAGED --> / <!-- /PAGED --> (the paged family's rows of
those runs: issue 21's target, >= 85% of copy for >= 16 MiB moved).
"""
import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.report import summary, table  # noqa: E402


def put(text, tag, body):
    block = f"<!-- {tag} -->\n{body.strip()}\n<!-- /{tag} -->"
    pat = re.compile(rf"<!-- {tag} -->.*?<!-- /{tag} -->", re.S)
    return pat.sub(lambda m: block, text) if pat.search(text) else text.replace(f"{tag}_TABLE", block)


PAGED_BACKENDS = ("cuda", "triton", "torch-loop", "cuda-per-layer", "triton-per-layer", "torch")


def paged_block(paths):
    rows, links = [], []
    for p in paths:
        p = pathlib.Path(p).resolve()
        rows += json.loads(p.read_text())
        links.append(f"[{p.name}]({p.relative_to(ROOT)})")
    ours = [r for r in rows if r["backend"] in ("cuda", "triton")]
    line = []
    for be in ("triton", "cuda"):
        dev = [r for r in ours if r["backend"] == be and not r["format"].startswith("host")]
        line.append(summary(dev, f"paged {be}", target=85, min_mib=16))
    host = [r for r in ours if r["format"].startswith("host") and r.get("status") == "ran"]
    hp = sorted(r["pct_copy"] for r in host if r["bytes"] >= 64 * 2**20)
    hl = (f"pinned host <-> GPU (copy and kernel paths): {sum(p >= 90 for p in hp)} of {len(hp)} rows of >= 64 MiB "
          f"at >= 90% of a pinned `cudaMemcpyAsync` of the same bytes, range {hp[0]:.1f}-{hp[-1]:.1f}%") if hp else ""
    return ("\n".join(f"* {x}" for x in line) + f" — {', '.join(links)}\n* {hl}\n\n"
            f"<details><summary>Every paged row of those runs</summary>\n\n{table(rows, PAGED_BACKENDS)}\n\n</details>")


def main(bench_json, quality_md=None, paged=()):
    readme = ROOT / "README.md"
    text = readme.read_text()
    bench_json = pathlib.Path(bench_json).resolve()
    rows = json.loads(bench_json.read_text())
    src = f"From [`{bench_json.relative_to(ROOT)}`]({bench_json.relative_to(ROOT)}):"
    body = (f"* {summary(rows, 'quant')} — [{bench_json.name}]({bench_json.relative_to(ROOT)})\n\n"
            f"<details><summary>Every row of that run</summary>\n\n{src}\n\n{table(rows)}\n\n</details>")
    text = put(text, "BENCH", body)
    if quality_md:
        text = put(text, "QUALITY", re.sub(r"(?m)^# ", "### ", pathlib.Path(quality_md).read_text()))
    if paged:
        text = put(text, "PAGED", paged_block(paged))
    readme.write_text(text)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("bench_json")
    ap.add_argument("quality_md", nargs="?")
    ap.add_argument("--paged", nargs="*", default=())
    a = ap.parse_args()
    main(a.bench_json, a.quality_md, a.paged)
