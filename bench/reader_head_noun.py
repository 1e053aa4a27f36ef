"""Study: does the noun a what/which question asks for pick the right span? Refitted on a candidates dump.

    .venv/bin/python bench/fit_reader.py --train squad2 --lm-rerank 24 --dump /tmp/dump.json   # once, < 8 min
    .venv/bin/python bench/reader_head_noun.py --dump /tmp/dump.json                           # ~1 min

"What profession were Ronald Robinson and John Gallagher?" asks for a profession, "Which region invented the
machine gun?" for a region, "What was the name of the rock ...?" for a rock. The reader's kinds (name, date,
number, phrase) do not see that noun, and a wrong phrase of the right sentence is its most common miss on
qa_dev_squad2. Columns tried, each added to the shipped features and refitted exactly as bench/fit_reader.py does
(fitted on squad2, its articles in 7 folds, qa_dev and covid held out):

- ``noun_cos``: MiniLM's cosine between the question's head noun phrase and the span, centred on the question's
  candidates (0 where the question names no noun);
- ``noun_in``: the span ends with that noun ("Genesis Rock" for "the name of the rock"), where ``echo`` alone
  counts the repeated word against it.

Not used by the reader unless the table says so (bench/README, "Stop 31").
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

_NAME_OF = re.compile(r"\b(?:name|kind|type|sort|form)s?\s+of\s+(?:the\s+|a\s+|an\s+)?([\w-]+)", re.I)
_WH_NOUN = re.compile(r"\b(?:what|which)\s+([\w-]+)(?:\s+([\w-]+))?", re.I)


def head_noun(question: str) -> str:
    """The noun phrase (one or two words) a what/which question asks for, or ""."""
    from memchat import text as T

    m = _NAME_OF.search(question)
    if m and m.group(1).lower() not in T.STOPWORDS:
        return m.group(1)
    m = _WH_NOUN.search(question)
    if not m or m.group(1).lower() in T.STOPWORDS or re.search(r"ed$", m.group(1), re.I):
        return ""  # "What was ...", "Which of ...", "What caused ...": no noun
    words = [m.group(1)]
    second = m.group(2) or ""
    if second and second.lower() not in T.STOPWORDS and not re.search(r"(ed|s)$", second, re.I):
        words.append(second)  # "Buddhist monastery", "English law"; not "region invented", "thesis specifies"
    return " ".join(words)


def add_columns(rows: list[dict]) -> int:
    from memchat import text as T
    from memchat.embeddings import Embedder

    emb, fired = Embedder(), 0
    for r in rows:
        n = len(r["f1"])
        r["noun_cos"], r["noun_in"] = np.zeros(n), np.zeros(n)
        noun = head_noun(r["q"]) if n else ""
        if not noun:
            continue
        fired += 1
        v = emb.encode([noun] + list(r["cands"]))
        cos = v[1:] @ v[0]
        r["noun_cos"] = cos - cos.mean()
        last = T.stem(noun.split()[-1].lower())
        r["noun_in"] = np.array([float(bool(c.split()) and T.stem(c.split()[-1].lower()) == last) for c in r["cands"]])
    return fired


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dump", required=True, help="bench/fit_reader.py --dump output")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fit_reader import load_dump, refit_header, refit_row, with_columns

    rows = load_dump(args.dump)
    fired = add_columns(rows)
    print(f"a head noun in {fired} of {sum(1 for r in rows if len(r['f1']))} questions with candidates")
    for r in [r for r in rows if r["set"] == "squad2" and len(r["f1"])][:40]:
        if head_noun(r["q"]):
            print(f"  {head_noun(r['q'])!r:24} {r['q'][:80]}")

    print(refit_header(by_document=7))
    for label, t in [("shipped", with_columns()), ("+ noun_cos", with_columns("noun_cos")),
                     ("+ noun_in", with_columns("noun_in")), ("+ both", with_columns("noun_cos", "noun_in"))]:
        print(refit_row(rows, label, t, by_document=7)[0], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
