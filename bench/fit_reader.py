"""Fit the extractive reader's weights (conditional logit over candidate spans) and report held-out quality.

    .venv/bin/python bench/fit_reader.py [--train squad2] [--lm-rerank 24] [--folds 2] [--out weights.json]

For each dev set it ingests the PDFs into a temporary store, retrieves (hybrid) and
selects evidence exactly as ``memchat.rag`` does, and computes every candidate span's
features (``memchat.reader.features``). The weights maximise the likelihood of the
best-F1 candidate per question (softmax over that question's candidates, L2 0.01),
fitted on ``--train`` sets only; the table shows F1 / contains of the chosen span on
every set, the held-out ones being the honest figure, and a k-fold split of the training
sets' questions (``--folds``). The oracle row is the best
candidate's F1 (the ceiling that candidate generation allows).

The fitted weights printed at the end are what ``config.ReaderConfig.weights`` holds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"
SETS = {"qa_dev": DATA / "qa_dev", "squad2": DATA / "qa_dev_squad2", "covid": DATA / "qa_dev_covid"}


def collect(name: str, folder: Path, rag, reader, limit: int) -> list[dict]:
    from memchat.evaluate import contains_gold, token_f1

    qs = [json.loads(line) for line in (folder / "qa.jsonl").read_text().splitlines() if line.strip()]
    if limit:
        qs = qs[:limit]
    rows = []
    t0 = time.perf_counter()
    for q in qs:
        hits = rag.retrieve(q["question"])
        ev = rag.select_evidence(q["question"], hits)[: rag.cfg.reader_sentences]
        sents = [e.sentence for e in ev]
        cands, X, _ = reader.scored(q["question"], sents, [e.score for e in ev], every_column=True)  # LM columns as when answering
        f1 = np.array([token_f1(sp.text, q["answers"]) for _, sp in cands], dtype=np.float32)
        cont = np.array([contains_gold(sp.text, q["answers"]) for _, sp in cands], dtype=np.float32)
        rows.append({"X": X, "f1": f1, "cont": cont, "set": name, "q": q["question"], "answers": q["answers"],
                     "sents": sents, "cands": [sp.text for _, sp in cands], "si": [si for si, _ in cands]})
    print(f"{name}: {len(qs)} questions, {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return rows


def fit(rows: list[dict], n_features: int, l2: float = 0.01, steps: int = 3000, lr: float = 0.1) -> np.ndarray:
    """Conditional logit: maximise sum log softmax(X w)[best-F1 candidate] (questions whose best F1 >= 0.5)."""
    data = [(r["X"], int(np.argmax(r["f1"]))) for r in rows if len(r["f1"]) and r["f1"].max() >= 0.5]
    mu = np.mean(np.vstack([x for x, _ in data]), axis=0)
    sd = np.std(np.vstack([x for x, _ in data]), axis=0) + 1e-6
    w = np.zeros(n_features)
    m = np.zeros(n_features)
    v = np.zeros(n_features)
    for step in range(1, steps + 1):  # Adam on standardised features
        g = l2 * w
        for x, y in data:
            z = (x - mu) / sd
            s = z @ w
            p = np.exp(s - s.max())
            p /= p.sum()
            g -= (z[y] - p @ z) / len(data)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        w -= lr * (m / (1 - 0.9**step)) / (np.sqrt(v / (1 - 0.999**step)) + 1e-8)
    return w / sd  # back to raw feature units (the constant shift does not change an argmax)


def quality(rows: list[dict], w: np.ndarray) -> tuple[float, float, float]:
    f1 = cont = oracle = 0.0
    for r in rows:
        if len(r["f1"]):
            i = int(np.argmax(r["X"] @ w))
            f1 += r["f1"][i]
            cont += r["cont"][i]
            oracle += r["f1"].max()
    n = max(1, len(rows))
    return 100 * f1 / n, 100 * cont / n, 100 * oracle / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", default="squad2", help="comma-separated sets to fit on (qa_dev, squad2, covid)")
    p.add_argument("--sets", default="qa_dev,squad2,covid", help="sets to report")
    p.add_argument("--lm-rerank", type=int, default=0, help="also score the best N candidates with the LM (0 = off)")
    p.add_argument("--limit", type=int, default=0, help="first N questions per set")
    p.add_argument("--out", default="", help="write the weights as JSON here")
    p.add_argument("--folds", type=int, default=2, help="also report a k-fold split of the training sets (0 = off)")
    p.add_argument("--dump", default="", help="write every question's candidates and features as JSON here")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from memchat.config import GenerationConfig, RAGConfig, ReaderConfig
    from memchat.knowledge import KnowledgeBase
    from memchat.rag import RAGPipeline, build_reader
    from memchat.reader import FEATURES

    generator = None
    if args.lm_rerank:
        from memchat.generation import Generator

        generator = Generator(GenerationConfig.model_name)
    rows: list[dict] = []
    for name in args.sets.split(","):
        home = tempfile.mkdtemp(prefix=f"memchat-fit-{name}-")
        kb = KnowledgeBase(Path(home) / "store")
        kb.add_documents(sorted((SETS[name] / "pdfs").glob("*.pdf")))
        rag = RAGPipeline(kb, generator, rag=RAGConfig())
        reader = build_reader(kb.embedder(), generator, kb.idf, ReaderConfig(lm_rerank=args.lm_rerank))
        rows += collect(name, SETS[name], rag, reader, args.limit)
    train = [r for r in rows if r["set"] in args.train.split(",")]
    w = fit(train, len(FEATURES))
    if not args.lm_rerank:
        w[[FEATURES.index("lm"), FEATURES.index("pmi")]] = 0.0
    print(f"{'set':8s} {'role':9s} {'F1':>6s} {'contains':>9s} {'oracle F1':>10s}   (current ReaderConfig: F1 / contains)")
    cur = np.asarray(ReaderConfig().weights)
    for name in args.sets.split(","):
        part = [r for r in rows if r["set"] == name]
        f1, cont, oracle = quality(part, w)
        f1c, contc, _ = quality(part, cur)
        role = "train" if name in args.train.split(",") else "held-out"
        print(f"{name:8s} {role:9s} {f1:6.1f} {cont:9.1f} {oracle:10.1f}   ({f1c:.1f} / {contc:.1f})")
    if args.folds > 1:  # the training sets' questions dealt into k folds: each fold scored by a fit on the others
        scores = [quality(train[k :: args.folds], fit([r for i, r in enumerate(train) if i % args.folds != k],
                                                      len(FEATURES)))[0] for k in range(args.folds)]
        print(f"{args.train:8s} {args.folds}-fold    {np.mean(scores):6.1f}   (F1 on each fold, fitted on the others)")
    weights = {f: round(float(x), 4) for f, x in zip(FEATURES, w)}
    print(json.dumps(weights))
    if args.out:
        Path(args.out).write_text(json.dumps(weights, indent=2))
    if args.dump:
        Path(args.dump).write_text(json.dumps([{**r, "X": r["X"].tolist(), "f1": r["f1"].tolist(),
                                                "cont": r["cont"].tolist()} for r in rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
