"""Study: three more signals for the extractive reader's span choice, each refitted on a dump of its candidates.

    .venv/bin/python bench/reader_signals.py --make-dumps /tmp/rs     # two fit_reader dumps, ~4 min each
    .venv/bin/python bench/reader_signals.py --dumps /tmp/rs          # the table, ~1 min

The first dump is ``bench/fit_reader.py --train squad2 --lm-rerank 24 --dump``; the second is the same with
``OTHER_SHOTS`` as the LM's worked examples in place of ``reader.READER_SHOTS``. Rows, each refitted as
bench/fit_reader.py does (fitted on squad2; 2-fold and 7 folds by article within it; qa_dev and covid held out):

- ``after-slot``: SQuAD questions keep the sentence's words around the answer. ``text.slot_words`` reads the words
  *before* the slot; for a subject question ("Who founded the university?") the words *after* the question word
  are the words after the answer ("[Joe] founded the university"). Column: those words matched against the
  words after the span (1/k for the k-th), with the question word's noun skipped for "what/which N" and
  questions with a do-auxiliary left out.
- ``redundancy``: how many of the other evidence sentences hold the span's text (answers that recur are likelier:
  the redundancy of AskMSR-style QA).
- ``prompt ensemble``: the ``lm`` and ``pmi`` columns averaged over the shipped worked examples and
  ``OTHER_SHOTS`` (ensembling prompts evens out the small LM's sensitivity to its examples).

None is used by the reader (bench/README: "Stop 29: three more reader signals").
"""

from __future__ import annotations

import argparse
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

# Made up for this study like READER_SHOTS (none from the dev sets), the same four kinds: a measure, a name, a date,
# a mechanism.
OTHER_SHOTS = (
    ("The first transatlantic telegraph cable was laid in 1858 between Ireland and Newfoundland, but it failed "
     "after three weeks.", "How long did the first transatlantic cable work?", "three weeks"),
    ("Insulin was first isolated in 1921 by Frederick Banting and Charles Best at the University of Toronto.",
     "Where was insulin first isolated?", "the University of Toronto"),
    ("The Great Fire of London broke out in a bakery on Pudding Lane in September 1666 and burned for four days.",
     "When did the Great Fire of London break out?", "September 1666"),
    ("Aspirin reduces pain and fever by inhibiting the cyclooxygenase enzymes that make prostaglandins.",
     "How does aspirin reduce fever?", "by inhibiting the cyclooxygenase enzymes"),
)
# The dump both runs make: the shipped reader's fit (bench/fit_reader.py), its 24 best candidates scored by the LM.
DUMP_ARGS = ["--train", "squad2", "--lm-rerank", "24", "--folds", "0"]
_DO_AUX = {"did", "does", "do", "had", "has", "have", "will", "would", "could", "can", "should"}
_BE = {"is", "was", "are", "were"}


def after_slot_words(question: str, n: int = 2) -> list[str]:
    """The stems of the words after a what/which/who question word ("Who [founded the] university?"); []
    where the question does not keep them in the sentence's order (do-auxiliaries, how/why/when/where)."""
    from memchat import text as T
    from memchat.text import DETERMINERS

    words = [t.text.lower() for t in T.tokens(question) if t.text[:1].isalnum()]
    for i, w in enumerate(words):
        if w in {"why", "how", "when", "where"}:
            return []
        if w in {"what", "which", "who", "whom", "whose"}:
            j = i + 1
            if w in {"what", "which", "whose"} and j < len(words) and words[j] not in _DO_AUX | _BE:
                j += 1  # "what year ...": the noun is the answer's kind, not a word after it
            rest = words[j:]
            if not rest or rest[0] in _DO_AUX:
                return []
            return [T.stem(x) for x in rest if x not in DETERMINERS][:n]
    return []


def add_columns(rows: list[dict]) -> int:
    """Columns ``after`` and ``redundancy`` on every row; returns how many questions have after-slot words."""
    from memchat import text as T
    from memchat.text import DETERMINERS

    fired = 0
    for r in rows:
        after = after_slot_words(r["q"])
        fired += bool(after)
        norm = [f" {T.normalize_answer(s)} " for s in r["sents"]]
        r["after"], r["redundancy"] = np.zeros(len(r["f1"])), np.zeros(len(r["f1"]))
        for k, (c, si) in enumerate(zip(r["cands"], r["si"])):
            s = r["sents"][si]
            start = s.find(c)
            if after and start >= 0:
                end = start + len(c)
                following = [T.stem(t.text.lower()) for t in T.tokens(s) if t.start >= end and t.text[:1].isalnum()
                             and t.text.lower() not in DETERMINERS][:len(after)]
                r["after"][k] = T.slot_match(after, following)
            nc = T.normalize_answer(c)
            r["redundancy"][k] = sum(1 for j, ns in enumerate(norm) if j != si and nc and f" {nc} " in ns)
    return fired


def make_dumps(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(REPO / "bench" / "fit_reader.py"), *DUMP_ARGS, "--dump",
                    str(folder / "shipped.json")], check=True, env=env)
    subprocess.run([sys.executable, __file__, "--other-shots-dump", str(folder / "other.json")], check=True, env=env)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--make-dumps", default="", help="write shipped.json and other.json (fit_reader dumps) here")
    p.add_argument("--dumps", default="", help="a folder --make-dumps wrote: print the table")
    p.add_argument("--other-shots-dump", default="", help=argparse.SUPPRESS)  # the second dump, in its own process
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.other_shots_dump:
        import memchat.reader as R

        R.READER_SHOTS = OTHER_SHOTS
        sys.argv = ["fit_reader.py", *DUMP_ARGS, "--dump", args.other_shots_dump]
        runpy.run_path(str(REPO / "bench" / "fit_reader.py"), run_name="__main__")
        return 0
    if args.make_dumps:
        make_dumps(Path(args.make_dumps))
    folder = Path(args.dumps or args.make_dumps or "")
    if not (folder / "shipped.json").exists():
        p.error("give --make-dumps DIR, or --dumps DIR with the two dumps in it")

    from fit_reader import by_document_f1, fit, load_dump, refit_row, with_columns

    from memchat.reader import FEATURES

    rows, other = load_dump(folder / "shipped.json"), load_dump(folder / "other.json")
    if [(r["q"], r["cands"]) for r in rows] != [(r["q"], r["cands"]) for r in other]:
        raise SystemExit("the two dumps hold other candidates: make them again at one commit")
    print(f"after-slot words in {add_columns(rows)} of {len(rows)} questions")
    lm = [FEATURES.index("lm"), FEATURES.index("pmi")]

    def ensemble(r):
        X = r["X"].copy()
        X[:, lm] = (r["X"][:, lm] + r["X_other"][:, lm]) / 2
        return X

    for r, o in zip(rows, other):
        r["X_other"] = o["X"]
    table = [("shipped", lambda r: r["X"]), ("+ after-slot", with_columns("after")), ("+ redundancy", with_columns("redundancy")),
             ("other worked examples", lambda r: r["X_other"]), ("prompt ensemble (mean of both)", ensemble)]
    print("| change | qa_dev (held out) | squad2 (train) | squad2 2-fold | covid (held out) | squad2 by article, 7 folds |")
    print("|---|---|---|---|---|---|")
    for label, t in table:
        train = [{**r, "X": t(r)} for r in rows if r["set"] == "squad2"]
        nf = next(r["X"].shape[1] for r in train if len(r["f1"]))
        by_article, _ = by_document_f1(train, lambda fold: fit(fold, nf), 7)
        print(f"{refit_row(rows, label, t)[0]} {by_article:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
