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

Trying other fits without scoring again: ``--dump rows.json`` once, then
``--from-dump rows.json --objective expected_f1`` (or ``--train qa_dev,squad2``, ``--l2 0.1``) in seconds.
``--confidence-curve`` prints what abstaining below a reader confidence would trade on each set.
``--by-document K`` scores folds of whole documents (articles the fit never saw), the honest held-out figure.
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
                     "doc": q.get("doc"),
                     "sents": sents, "cands": [sp.text for _, sp in cands], "si": [si for si, _ in cands]})
    print(f"{name}: {len(qs)} questions, {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return rows


OBJECTIVES = ("best", "soft", "expected_f1")


def pack(rows: list[dict]):
    """Questions with candidates as padded arrays: features (q, n, f), mask (q, n), F1 (q, n)."""
    rows = [r for r in rows if len(r["f1"])]
    n, f = max(len(r["f1"]) for r in rows), rows[0]["X"].shape[1]
    X, M, Y = np.zeros((len(rows), n, f)), np.zeros((len(rows), n), bool), np.zeros((len(rows), n))
    for i, r in enumerate(rows):
        k = len(r["f1"])
        X[i, :k], M[i, :k], Y[i, :k] = r["X"], True, r["f1"]
    return X, M, Y


def fit(rows: list[dict], n_features: int, l2: float = 0.01, steps: int = 3000, lr: float = 0.1,
        objective: str = "best") -> np.ndarray:
    """Conditional logit over each question's candidates (softmax of X w), Adam on standardised features.

    best         maximise log p(the best-F1 candidate), questions whose best F1 >= 0.5 (the default);
    soft         the same with the target spread over the candidates in proportion to F1 squared;
    expected_f1  maximise the expected F1 of the pick, sum p x F1, on every question.
    """
    X, M, Y = pack(rows)
    flat = X[M]
    mu, sd = flat.mean(0), flat.std(0) + 1e-6
    Z = np.where(M[..., None], (X - mu) / sd, 0.0)
    if objective in ("best", "soft"):
        keep = Y.max(1) >= 0.5
        Z, M, Y = Z[keep], M[keep], Y[keep]
        if objective == "best":
            T = np.zeros_like(Y)
            T[np.arange(len(Y)), Y.argmax(1)] = 1.0
        else:
            T = np.where(M, Y, 0.0) ** 2
            T /= T.sum(1, keepdims=True)
    w, m, v = np.zeros(n_features), np.zeros(n_features), np.zeros(n_features)
    for step in range(1, steps + 1):
        s = np.where(M, Z @ w, -1e9)
        p = np.exp(s - s.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        if objective == "expected_f1":
            g = -np.einsum("qn,qnf->f", p * (Y - (p * Y).sum(1, keepdims=True)), Z) / len(Z)
        else:
            g = -np.einsum("qn,qnf->f", T - p, Z) / len(Z)
        g += l2 * w
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        w -= lr * (m / (1 - 0.9**step)) / (np.sqrt(v / (1 - 0.999**step)) + 1e-8)
    return w / sd  # back to raw feature units (the constant shift does not change an argmax)


def misses(rows: list[dict], w: np.ndarray) -> str:
    """Where the pick (F1 < 0.5) went wrong: a good candidate (F1 >= 0.5) in the chosen sentence, in another, or none."""
    same = other = none = wrong = 0
    for r in rows:
        if not len(r["f1"]):
            wrong, none = wrong + 1, none + 1
            continue
        i, b = int(np.argmax(r["X"] @ w)), int(np.argmax(r["f1"]))
        if r["f1"][i] >= 0.5:
            continue
        wrong += 1
        if r["f1"][b] < 0.5:
            none += 1
        elif r["si"][i] == r["si"][b]:
            same += 1
        else:
            other += 1
    return (f"{wrong} of {len(rows)} picks score F1 < 0.5: a good candidate in the chosen sentence {same}, "
            f"in another sentence {other}, none {none}")


def confidence_curve(rows: list[dict], w: np.ndarray, taus=(0.1, 0.15, 0.2, 0.25, 0.3)) -> list[str]:
    """What abstaining below a confidence (the pick's softmax probability) would trade: answered, F1, wrong+conf."""
    from memchat.evaluate import WRONG_F1

    conf, f1 = [], []
    for r in rows:
        if not len(r["f1"]):
            conf.append(0.0)
            f1.append(0.0)
            continue
        s = r["X"] @ w
        p = np.exp(s - s.max())
        conf.append(float(p.max() / p.sum()))
        f1.append(float(r["f1"][int(np.argmax(s))]))
    conf, f1 = np.array(conf), np.array(f1)
    out = []
    for tau in taus:
        ans = conf >= tau
        out.append(f"p >= {tau:.2f}: answered {100 * ans.mean():5.1f}%, F1 {100 * np.where(ans, f1, 0).mean():5.1f}, "
                   f"wrong+conf {100 * (ans & (f1 < WRONG_F1)).mean():5.1f}%, F1 of the withheld "
                   f"{100 * f1[~ans].mean() if (~ans).any() else 0:5.1f}")
    return out


LEGACY_COLUMNS = ("cloze", "gain")  # the first two columns of dumps written before stop 27, which name none


def load_dump(path: str | Path) -> list[dict]:
    """A ``--dump`` file's questions, their features (the reader's ``FEATURES``, in order), F1 and contains back as
    arrays. Each row names its columns; an older dump without names had ``LEGACY_COLUMNS`` first."""
    from memchat.reader import FEATURES

    out = []
    for r in json.loads(Path(path).read_text()):
        names = list(r.get("features") or LEGACY_COLUMNS + FEATURES)
        X = np.asarray(r["X"], dtype=np.float64).reshape(-1, len(names))
        out.append({**r, "X": X[:, [names.index(f) for f in FEATURES]], "f1": np.asarray(r["f1"]),
                    "cont": np.asarray(r["cont"])})
    return out


def kfold_f1(train: list[dict], fit_on, k: int = 2) -> float:
    """Mean F1 over ``train``'s questions dealt into ``k`` folds, each scored by ``fit_on`` the others."""
    return float(np.mean([quality(train[i::k], fit_on([r for j, r in enumerate(train) if j % k != i]))[0]
                          for i in range(k)]))


def document_of(rows: list[dict]) -> list[str]:
    """Each row's document (older dumps lack it: found again by the question's text in its set's qa.jsonl)."""
    found: dict[tuple[str, str], str] = {}
    for name, folder in SETS.items():
        for line in (folder / "qa.jsonl").read_text().splitlines():
            if line.strip():
                q = json.loads(line)
                found[(name, q["question"])] = q.get("doc") or ""
    return [r.get("doc") or found.get((r["set"], r["q"]), "") for r in rows]


def by_document_f1(train: list[dict], fit_on, k: int) -> tuple[float, int]:
    """F1 over ``train``'s questions with whole documents dealt into ``k`` folds, each scored by a fit on the
    others: the reader never saw the article it is scored on, as with a user's own documents."""
    docs = document_of(train)
    names = sorted(set(docs))
    k = min(k, len(names))
    total = 0.0
    for i in range(k):
        held = set(names[i::k])
        test = [r for r, d in zip(train, docs) if d in held]
        total += quality(test, fit_on([r for r, d in zip(train, docs) if d not in held]))[0] * len(test)
    return total / max(1, len(train)), len(names)


def with_columns(*names: str):
    """A ``refit_row`` transform: the shipped features plus each row's per-candidate columns ``names``."""
    return lambda r: np.hstack([r["X"]] + [np.asarray(r[n]).reshape(-1, 1) for n in names])


def refit_header(first: str = "columns", by_document: int = 0) -> str:
    """The two header lines of a table of ``refit_row`` rows made with the same ``by_document``."""
    held = f"squad2 by article, {by_document} folds" if by_document else "squad2 2-fold"
    return f"| {first} | qa_dev (held out) | squad2 (train) | {held} | covid (held out) |\n|---|---|---|---|---|"


def refit_row(rows: list[dict], label: str, transform, by_document: int = 0) -> tuple[str, np.ndarray]:
    """A reader study's table row: refit on squad2 with ``transform(row) -> feature rows`` as main() fits, then
    span-choice F1 / contains on qa_dev and covid (held out) and squad2 (the fit's own), and squad2 held out: 2 folds
    of questions, or ``by_document`` folds of articles. Returns the row and the weights fitted on all of squad2."""
    rr = [{**r, "X": transform(r)} for r in rows]
    nf = next(r["X"].shape[1] for r in rr if len(r["f1"]))
    train = [r for r in rr if r["set"] == "squad2"]
    w = fit(train, nf)
    res = {s: quality([r for r in rr if r["set"] == s], w)[:2] for s in ("qa_dev", "squad2", "covid")}
    fit_on = lambda fold: fit(fold, nf)  # noqa: E731
    held = by_document_f1(train, fit_on, by_document)[0] if by_document else kfold_f1(train, fit_on)
    return (f"| {label} | {res['qa_dev'][0]:.1f} / {res['qa_dev'][1]:.1f} | {res['squad2'][0]:.1f} / "
            f"{res['squad2'][1]:.1f} | {held:.1f} | {res['covid'][0]:.1f} / {res['covid'][1]:.1f} |"), w


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
    p.add_argument("--by-document", type=int, default=0,
                   help="also report K folds of whole documents of the training sets (each scored by a fit on the "
                        "others: the held-out-article figure; 0 = off)")
    p.add_argument("--dump", default="", help="write every question's candidates and features as JSON here")
    p.add_argument("--from-dump", default="", help="read the candidates and features from a --dump file instead "
                   "of ingesting and scoring (seconds, not minutes: for trying objectives)")
    p.add_argument("--objective", default="best", choices=OBJECTIVES, help="what the fit maximises (see fit())")
    p.add_argument("--l2", type=float, default=0.01, help="L2 penalty on the standardised weights")
    p.add_argument("--reader-sentences", type=int, default=0,
                   help="evidence sentences the reader takes spans from (0 = RAGConfig's default)")
    p.add_argument("--confidence-curve", action="store_true",
                   help="also print what abstaining below a confidence would trade, per set")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from memchat.config import GenerationConfig, RAGConfig, ReaderConfig
    from memchat.knowledge import KnowledgeBase
    from memchat.rag import RAGPipeline, build_reader
    from memchat.reader import FEATURES

    rows: list[dict] = []
    lm_scored = bool(args.lm_rerank)
    if args.from_dump:
        rows = [r for r in load_dump(args.from_dump) if r["set"] in args.sets.split(",")]
        lm_cols = [FEATURES.index("lm"), FEATURES.index("pmi")]
        lm_scored = any(np.any(r["X"][:, lm_cols]) for r in rows if len(r["f1"]))  # was the dump made with the LM?
    else:
        generator = None
        if args.lm_rerank:
            from memchat.generation import Generator

            generator = Generator(GenerationConfig.model_name)
        for name in args.sets.split(","):
            with tempfile.TemporaryDirectory(prefix=f"memchat-fit-{name}-") as home:  # the store and its key go after
                kb = KnowledgeBase(Path(home) / "store")
                kb.add_documents(sorted((SETS[name] / "pdfs").glob("*.pdf")))
                cfg = RAGConfig()
                if args.reader_sentences:
                    cfg.reader_sentences = args.reader_sentences
                rag = RAGPipeline(kb, generator, rag=cfg)
                reader = build_reader(generator, kb.idf, ReaderConfig(lm_rerank=args.lm_rerank))
                rows += collect(name, SETS[name], rag, reader, args.limit)
    train = [r for r in rows if r["set"] in args.train.split(",")]

    def fit_on(part):
        return fit(part, len(FEATURES), l2=args.l2, objective=args.objective)

    w = fit_on(train)
    if not lm_scored:
        w[[FEATURES.index("lm"), FEATURES.index("pmi")]] = 0.0
    print(f"{'set':8s} {'role':9s} {'F1':>6s} {'contains':>9s} {'oracle F1':>10s}   (current ReaderConfig: F1 / contains)")
    cur = np.asarray(ReaderConfig().weights)
    for name in args.sets.split(","):
        part = [r for r in rows if r["set"] == name]
        f1, cont, oracle = quality(part, w)
        f1c, contc, _ = quality(part, cur)
        role = "train" if name in args.train.split(",") else "held-out"
        print(f"{name:8s} {role:9s} {f1:6.1f} {cont:9.1f} {oracle:10.1f}   ({f1c:.1f} / {contc:.1f})")
        print(f"{'':18s} {misses(part, w)}")
    if args.folds > 1:  # the training sets' questions dealt into k folds: each fold scored by a fit on the others
        print(f"{args.train:8s} {args.folds}-fold    {kfold_f1(train, fit_on, args.folds):6.1f}   "
              "(F1 on each fold, fitted on the others)")
    if args.by_document > 1:
        f1, n_docs = by_document_f1(train, fit_on, args.by_document)
        print(f"{args.train:8s} by doc    {f1:6.1f}   (F1 with {n_docs} documents in {min(args.by_document, n_docs)} "
              "folds: each fold's questions scored by a fit on the other documents)")
    if args.confidence_curve:
        for name in args.sets.split(","):
            print(f"{name}: abstaining below a confidence, with these weights")
            for line in confidence_curve([r for r in rows if r["set"] == name], w):
                print("  " + line)
    weights = {f: round(float(x), 4) for f, x in zip(FEATURES, w)}
    print(json.dumps(weights))
    if args.out:
        Path(args.out).write_text(json.dumps(weights, indent=2))
    if args.dump:
        Path(args.dump).write_text(json.dumps([{**r, "features": list(FEATURES), "X": r["X"].tolist(),
                                                "f1": r["f1"].tolist(),
                                                "cont": r["cont"].tolist()} for r in rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
