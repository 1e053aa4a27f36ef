"""Study: four more changes to the extractive reader's scoring, each refitted on a dump of its candidates.

    .venv/bin/python bench/fit_reader.py --train squad2 --lm-rerank 24 --dump /tmp/dump.json   # once, ~10 min
    .venv/bin/python bench/reader_columns.py --dump /tmp/dump.json                             # ~1 min

Each row changes the dump's feature rows, refits the reader exactly as bench/fit_reader.py does
(fitted on squad2, 2-fold within it, qa_dev and covid held out) and reports span-choice F1 /
contains, beside the shipped features fitted the same way in the same run:

- ``window cloze``: the ``cloze`` column (the question's cosine to the sentence with the span
  replaced by "what") on a window of 4 or 8 words each side of the span instead of the whole
  sentence, so a long sentence's other clauses do not dilute it;
- ``do-aux slot``: ``text.slot_words`` for fronted questions with an auxiliary ("Who did Luther
  remind the peasants to obey?"): the question's last word, often the verb the answer follows;
- ``interaction``: one product of two columns (the reader is linear in each alone);
- ``within-question``: a column standardised, or ranked, among the question's candidates; and the
  fit's L2 penalty. (The ``cloze`` column this study also standardised left the reader in stop 27.)

None is used by the reader (bench/README: "Reader changes tried in stop 25").
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

_DO_AUX = re.compile(r"^\s*(what|who|whom|which\s+\w+|what\s+\w+)\s+(did|does|do|had|has|have|will|would|could|can|"
                     r"should)\b", re.IGNORECASE)


def window_cloze(rows: list[dict], width: int) -> None:
    """Column ``w{width}``: cos(question, the span's window with the span replaced by "what")."""
    from memchat import text as T
    from memchat.embeddings import Embedder

    emb = Embedder()

    def window(sentence: str, cand: str) -> str:
        st = sentence.find(cand)
        en = st + len(cand)
        toks = T.tokens(sentence)
        before = [t for t in toks if t.end <= st][-width:]
        after = [t for t in toks if t.start >= en][:width]
        a = before[0].start if before else st
        b = after[-1].end if after else en
        return sentence[a:st] + "what" + sentence[en:b]

    for r in rows:
        if not len(r["f1"]):
            r[f"w{width}"] = np.zeros(0)
            continue
        v = emb.encode([r["q"]] + [window(r["sents"][si], c) for c, si in zip(r["cands"], r["si"])])
        r[f"w{width}"] = v[1:] @ v[0]


def do_aux_slot(rows: list[dict]) -> int:
    """Column ``slot2``: the shipped slot, or for fronted auxiliary questions without one, the last word's match."""
    from memchat import text as T
    from memchat.reader import FEATURES

    col, fired = FEATURES.index("slot"), 0
    for r in rows:
        r["slot2"] = r["X"][:, col].copy()
        q = r["q"]
        if T.slot_words(q) or not _DO_AUX.search(q) or not len(r["f1"]):
            continue
        fired += 1
        words = [t.text.lower() for t in T.tokens(q) if t.text[:1].isalnum()]
        slot = [T.stem(words[-1])]
        for n, (c, si) in enumerate(zip(r["cands"], r["si"])):
            sentence = r["sents"][si]
            r["slot2"][n] = T.slot_match(slot, T.words_before(T.tokens(sentence), sentence.find(c)))
    return fired


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dump", required=True, help="bench/fit_reader.py --dump output")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fit_reader import load_dump, refit_header, refit_row, with_columns

    from memchat.reader import FEATURES

    F = {n: i for i, n in enumerate(FEATURES)}
    rows = load_dump(args.dump)
    window_cloze(rows, 4)
    window_cloze(rows, 8)
    fired = do_aux_slot(rows)
    print(f"do-aux slot fires on {fired} questions without a slot")

    def product(a, b):
        return lambda r: np.hstack([r["X"], (r["X"][:, F[a]] * r["X"][:, F[b]]).reshape(-1, 1)])

    def replaced(name, col):
        return lambda r: np.where(np.arange(len(FEATURES)) == F[name], r[col].reshape(-1, 1), r["X"])

    def within(name, how):
        def t(r):
            X = r["X"].copy()
            v = X[:, F[name]]
            if len(v):
                X[:, F[name]] = (v - v.mean()) / (v.std() + 1e-6) if how == "z" else -np.argsort(np.argsort(-v))
            return X
        return t

    print(refit_header("change"))
    for label, t in [("shipped", lambda r: r["X"]),
                     ("+ window cloze, 4 words", with_columns("w4")), ("+ window cloze, 8 words", with_columns("w8")),
                     ("do-aux slot", replaced("slot", "slot2")),
                     ("+ lm x pmi", product("lm", "pmi")), ("+ kind_match x lm", product("kind_match", "lm")),
                     ("+ slot x lm", product("slot", "lm")),
                     ("lm standardised within the question", within("lm", "z")),
                     ("lm as its rank within the question", within("lm", "rank"))]:
        print(refit_row(rows, label, t)[0], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
