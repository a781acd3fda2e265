"""Regenerate the README's measured tables from committed results.

    python scripts/update_readme.py bench/results/<gpu-run>.json docs/model-quality.md

Replaces the blocks between <!-- BENCH --> / <!-- /BENCH --> and <!-- QUALITY --> / <!-- /QUALITY -->.
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


def main(bench_json, quality_md=None):
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
    readme.write_text(text)


if __name__ == "__main__":
    main(*sys.argv[1:])
