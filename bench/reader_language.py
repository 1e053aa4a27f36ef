"""Extractive answers from documents that are not in English: the reader's phrase against the best sentence.

    .venv/bin/python bench/reader_language.py                 # ~3 min on 2 cores
    .venv/bin/python bench/reader_language.py --no-dev-sets   # only the non-English questions (~1 min)

The extractive reader's candidates and features are English rules (capitalised names, function words at a
phrase's edges, wh-words, units). ``config.ReaderConfig.min_english_share`` decides when they apply: below that
share of English function words in the reader's evidence sentences (``text.english_share``), the answer is the
best evidence sentence itself. This bench prints:

1. the share over the reader's evidence for every question of the three English dev sets (each asked of a store of
   its own PDFs), and how many of them would be answered by sentence at the shipped threshold (it should be none);
2. questions in German, French and Japanese about the three non-English PDFs of ../shared/data/pdfs/non_english
   (written for this bench; each gold answer checked against the PDF's text), asked of one store of those PDFs:
   does the answer contain the gold, with the phrase reader (the baseline: the threshold at 0) against the
   shipped sentence fallback, and the answers' length in words.

Not a test: a handful of hand-written questions, so read the rows, not only the totals.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SHARED_DATA, table  # noqa: E402

sys.path.insert(0, str(REPO))

DEV_SETS = {"qa_dev": "qa_dev", "squad2": "qa_dev_squad2", "covid": "qa_dev_covid"}
NON_ENGLISH = SHARED_DATA / "pdfs" / "non_english"
PDFS = ["debian-edu-bullseye-manual-de.pdf", "2023-06-20-PV.pdf", "debian-edu-bullseye-manual-ja.pdf"]
# (language, question, gold answers): the gold is a phrase of the PDF's text (pypdf's extraction).
QUESTIONS = [
    ("de", "Welche IP-Adresse hat der Hauptserver tjener?", ["10.0.2.2"]),
    ("de", "Wie viel Plattenplatz braucht ein LTSP-Server?", ["40 GiB"]),
    ("de", "Mit wie viel RAM sind Thin Clients möglich?", ["256 MiB"]),
    ("de", "Wie viele Netzwerkkarten benötigen LTSP-Server?", ["zwei"]),
    ("de", "Wie viele Hauptserver darf man pro Schule einrichten?", ["einen Hauptserver", "nur einen"]),
    ("fr", "À quelle heure la séance est-elle ouverte?", ["16h00"]),
    ("fr", "Qui est la greffière adjointe?", ["Ariane Bélanger"]),
    ("fr", "Combien de logements le projet permet-il d'ajouter?", ["43"]),
    ("fr", "À quelle heure la séance est-elle levée?", ["16h05"]),
    ("fr", "Quand l'avis public de démolition a-t-il été publié?", ["7 juin 2023"]),
    ("ja", "主サーバーの IP アドレスは何ですか?", ["10.0.2.2"]),
    ("ja", "LTSP サーバー プロファイルに必要なディスク容量は?", ["40 GiB"]),
    ("ja", "ISO イメージの大きさは?", ["5 GiB"]),
]


def contains(answer: str, golds: list[str]) -> bool:
    """The gold inside the answer, white space ignored (the answers here are not English: no article stripping)."""
    flat = "".join(answer.split()).lower()
    return any("".join(g.split()).lower() in flat for g in golds)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-dev-sets", action="store_true", help="skip part 1 (the English dev sets' shares)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    import json

    import numpy as np

    from memchat import text as T
    from memchat.config import RAGConfig, ReaderConfig
    from memchat.knowledge import KnowledgeBase
    from memchat.rag import SENTENCE, RAGPipeline

    shipped_cfg = ReaderConfig()
    shipped = shipped_cfg.min_english_share
    cfg = RAGConfig(mode="extractive")

    temps: list[tempfile.TemporaryDirectory] = []  # each store and its key, removed when the run ends

    def store_of(pdfs: list[Path], name: str) -> KnowledgeBase:
        temps.append(tempfile.TemporaryDirectory(prefix=f"memchat-lang-{name}-"))
        kb = KnowledgeBase(Path(temps[-1].name) / "store")
        kb.add_documents(pdfs)
        return kb

    if not args.no_dev_sets:
        rows = []
        for name, folder in DEV_SETS.items():
            kb = store_of(sorted((SHARED_DATA / folder / "pdfs").glob("*.pdf")), name)
            rag = RAGPipeline(kb, None, rag=cfg)  # retrieval and evidence only: no model loads
            shares, fallbacks = [], 0
            for line in open(SHARED_DATA / folder / "qa.jsonl", encoding="utf-8"):
                q = json.loads(line)["question"]
                hits, evidence, _, _ = rag.prepare(q)
                text = " ".join(e.sentence for e in evidence[: cfg.reader_sentences])
                shares.append(T.english_share(text))
                fallbacks += not T.reads_as_english(text, shipped, shipped_cfg.min_language_words)
            s = np.array(shares)
            rows.append([name, str(len(s)), f"{s.min():.2f}", f"{np.percentile(s, 5):.2f}", f"{np.median(s):.2f}",
                         str(fallbacks)])
            print(f"{name}: {len(s)} questions", file=sys.stderr)
        fallback = f"answered by sentence (below {shipped}, {shipped_cfg.min_language_words}+ words)"
        print(table(["set", "questions", "min", "p5", "median", fallback], rows,
                    title="1. English function-word share of the reader's evidence, English dev sets"))

    kb = store_of([NON_ENGLISH / f for f in PDFS], "non-english")
    base = RAGPipeline(kb, None, rag=cfg, reader=ReaderConfig(min_english_share=0.0))
    shipped_rag = RAGPipeline(kb, base.generator, rag=cfg)  # one model for both rows
    rows, totals = [], {"phrase": 0, "fallback": 0, "abstained": 0}
    for lang, question, golds in QUESTIONS:
        a, b = base.answer(question), shipped_rag.answer(question)
        share = T.english_share(" ".join(e.sentence for e in b.evidence[: cfg.reader_sentences]))
        hit_a, hit_b = contains(a.text, golds) and not a.abstained, contains(b.text, golds) and not b.abstained
        totals["phrase"] += hit_a
        totals["fallback"] += hit_b
        totals["abstained"] += b.abstained
        rows.append([lang, question, golds[0], f"{share:.2f}", "yes" if hit_a else "no", a.text[:40],
                     "yes" if hit_b else "no", f"{len(b.text.split())}{' (sentence)' if b.picked == SENTENCE else ''}"])
    print(table(["lang", "question", "gold", "share", "phrase contains", "phrase answer", "shipped contains",
                 "shipped words"], rows, title="2. Non-English questions, one store of the three PDFs"))
    n = len(QUESTIONS)
    print(f"\ncontains the gold: phrase reader {totals['phrase']}/{n}, shipped (sentence when not English) "
          f"{totals['fallback']}/{n}; abstained {totals['abstained']}/{n}; threshold {shipped}")
    for t in temps:
        t.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
