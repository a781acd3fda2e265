"""Builds kb.json (run once; the JSON is committed): passages cut from the public-domain texts
(Jane Austen, Project Gutenberg: /work/shared/data/text/{prideprejudice,persuasion}.txt) by
line range, each with invented facts inserted, and questions with gold answers. The facts are
not in the books, so a model can only answer from the passages it is given.

    python kvkernels/data/kb/make_kb.py [TEXT_DIR]
"""
import json
import pathlib
import sys

TEXT = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data/text")

# (id, book, first line, last line (1-based, inclusive), fact sentences appended to the cut)
PASSAGES = [
    ("pp-bennet-cook", "prideprejudice.txt", 1501, 1511,
     "The Bennets' cook was a woman named Hester Pole. Hester Pole made the supper for the Netherfield ball."),
    ("pp-sonnet", "prideprejudice.txt", 1519, 1529,
     "Darcy copied his favourite sonnet into a green notebook."),
    ("pp-netherfield-ball", "prideprejudice.txt", 2081, 2094,
     "The Netherfield ball began at nine o'clock, and its musicians came from Meryton."),
    ("pe-admiral-croft", "persuasion.txt", 611, 622,
     "Admiral Croft had commanded a frigate called the Amaranth."),
    ("pe-amaranth", "persuasion.txt", 1701, 1712,
     "The frigate Amaranth had been built at Plymouth. Charles Musgrove kept a spaniel named Rufus."),
    ("pe-anne-canary", "persuasion.txt", 3004, 3011,
     "Anne Elliot kept a canary called Pip. Mr Shepherd had given Anne the canary."),
]

QUESTIONS = [
    ("What was the name of the Bennets' cook?", ["pp-bennet-cook"], "Hester Pole", ["Hester"]),
    ("What colour was the notebook into which Darcy copied his favourite sonnet?", ["pp-sonnet"], "green", []),
    ("What was the name of the frigate Admiral Croft had commanded?", ["pe-admiral-croft"], "Amaranth", []),
    ("What was the name of Charles Musgrove's spaniel?", ["pe-amaranth"], "Rufus", []),
    ("What was the name of Anne Elliot's canary?", ["pe-anne-canary"], "Pip", []),
    ("Where did the musicians of the Netherfield ball come from?", ["pp-netherfield-ball"], "Meryton", []),
    # two passages: the entity is named in one, its property stated in the other
    ("Where was the frigate that Admiral Croft had commanded built?", ["pe-admiral-croft", "pe-amaranth"],
     "Plymouth", []),
    ("At what time did the ball for which Hester Pole made the supper begin?",
     ["pp-bennet-cook", "pp-netherfield-ball"], "nine", ["9"]),
]


def main():
    books = {}
    passages = []
    for pid, book, a, b, fact in PASSAGES:
        lines = books.setdefault(book, (TEXT / book).read_text(encoding="utf-8").splitlines())
        cut = " ".join(" ".join(l.split()) for l in lines[a - 1:b] if l.strip())
        passages.append({"id": pid, "source": f"{book} lines {a}-{b} (Jane Austen, public domain)",
                         "inserted_facts": fact, "text": f"{cut} {fact}"})
    qs = [{"id": f"q{i}", "question": q, "passages": ps, "answer": ans, "aliases": al}
          for i, (q, ps, ans, al) in enumerate(QUESTIONS)]
    out = {"about": "kvkernels demo knowledge base: passages of Pride and Prejudice and Persuasion with invented "
                    "facts inserted (not in the books); questions answerable only from the given passages.",
           "passages": passages, "questions": qs}
    p = pathlib.Path(__file__).with_name("kb.json")
    p.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{p}: {len(passages)} passages, {len(qs)} questions")


if __name__ == "__main__":
    main()
