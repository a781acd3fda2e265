"""The bundled knowledge base (``kvkernels/data/kb/kb.json``) and the prompt's token layout.

A prompt is ``prefix | passage_1 | ... | passage_k | suffix`` where every piece is tokenized on
its own, so the token ids of "passages as text" (full prefill) and of "passages as stored KV"
are identical: the methods differ only in how the KV of the passages is obtained.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Dict, List, Optional

KB_PATH = Path(__file__).resolve().parent.parent / "data" / "kb" / "kb.json"
PREFIX = ("<|im_start|>system\nAnswer the question with a few words taken from the passages.<|im_end|>\n"
          "<|im_start|>user\nPassages:\n")
SUFFIX = "\nQuestion: {question}<|im_end|>\n<|im_start|>assistant\nAnswer:"


@dataclasses.dataclass
class Question:
    id: str
    question: str
    passages: List[str]
    answer: str
    aliases: List[str]

    def correct(self, text: str) -> bool:
        """Whether the generated ``text`` contains the gold answer or an alias (case-insensitive,
        whole words)."""
        return any(re.search(rf"\b{re.escape(a.lower())}\b", text.lower()) for a in [self.answer, *self.aliases])


@dataclasses.dataclass
class KnowledgeBase:
    passages: Dict[str, str]
    questions: List[Question]

    @classmethod
    def load(cls, path: Optional[Path] = None) -> "KnowledgeBase":
        d = json.loads(Path(path or KB_PATH).read_text(encoding="utf-8"))
        return cls({p["id"]: p["text"] for p in d["passages"]},
                   [Question(q["id"], q["question"], q["passages"], q["answer"], q.get("aliases", []))
                    for q in d["questions"]])

    def subset(self, n_questions: Optional[int]) -> "KnowledgeBase":
        """The first ``n_questions`` questions and only the passages they need."""
        qs = self.questions if not n_questions else self.questions[:n_questions]
        need = {p for q in qs for p in q.passages}
        return KnowledgeBase({k: v for k, v in self.passages.items() if k in need}, qs)


class Tokens:
    """Token ids of the prompt pieces (lists of ints) for one tokenizer."""

    def __init__(self, tokenizer, kb: KnowledgeBase, passage_tokens: Optional[int] = None):
        self.tok = tokenizer
        enc = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
        self.prefix = enc(PREFIX)
        self.passages = {}
        for pid, text in kb.passages.items():
            ids = enc(text + "\n")
            if passage_tokens:  # tile (or cut) to a fixed length: timing at larger contexts
                ids = (ids * (passage_tokens // len(ids) + 1))[:passage_tokens]
            self.passages[pid] = ids
        self._enc = enc

    def suffix(self, q: Question) -> List[int]:
        return self._enc(SUFFIX.format(question=q.question))

    def full(self, q: Question) -> List[int]:
        ids = list(self.prefix)
        for p in q.passages:
            ids += self.passages[p]
        return ids + self.suffix(q)
