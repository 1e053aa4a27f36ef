"""Study: does the question's likelihood given a span help the extractive reader pick it?

    .venv/bin/python bench/fit_reader.py --train squad2 --lm-rerank 24 --dump /tmp/dump.json   # once, ~10 min
    .venv/bin/python bench/reader_qlm.py --dump /tmp/dump.json                                 # ~5 s a question

The reader's ``lm`` column reads the span after the question (log p(span | evidence, question)).
This turns it round, as question-generation rerankers do (Lewis & Fan 2019; Sachan et al. 2022,
"UPR"): log p(question | the span's sentence, "Answer: span"), for the shipped reader's best 24
candidates of each question, and the same minus log p(question | the sentence alone) (``qpmi``).
The columns are added to the dump's features and the reader refitted exactly as
bench/fit_reader.py does (fitted on squad2, 2-fold within it, qa_dev and covid held out),
beside the same fit without them in the same run, and each column alone as the pick.
The reader does not use it (bench/README: "Question likelihood").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

SYSTEM = "Write the question that the answer answers, using the words of the context."
SHOT = ("The Eiffel Tower was completed in 1889 for the World's Fair in Paris.", "1889",
        "When was the Eiffel Tower completed?")
TOP = 24  # as ReaderConfig.lm_rerank


def question_scores(gen, rows: list[dict], weights: np.ndarray) -> list[dict]:
    """Per question: the top candidates by ``weights``, log p(question | sentence, answer) and | sentence."""
    import torch

    def prompt(sentence: str, answer: str | None) -> list[int]:
        last = f"Context: {sentence}" + (f"\nAnswer: {answer}" if answer is not None else "")
        messages = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"Context: {SHOT[0]}\nAnswer: {SHOT[1]}"},
                    {"role": "assistant", "content": SHOT[2]}, {"role": "user", "content": last}]
        return gen.encode(gen.format_prompt(messages))

    @torch.inference_mode()
    def score(pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        width = max(len(p) + len(t) for p, t in pairs)
        ids = torch.full((len(pairs), width), gen.pad_id)
        att = torch.zeros((len(pairs), width), dtype=torch.long)
        for i, (p, t) in enumerate(pairs):
            ids[i, : len(p) + len(t)] = torch.tensor(p + t)
            att[i, : len(p) + len(t)] = 1
        lp = torch.log_softmax(gen.model(input_ids=ids, attention_mask=att).logits.float(), -1)
        return [float(lp[i, torch.arange(len(p) - 1, len(p) + len(t) - 1), torch.tensor(t)].sum())
                for i, (p, t) in enumerate(pairs)]

    out, t0 = [], time.perf_counter()
    for n, r in enumerate(rows):
        if not len(r["f1"]):
            out.append({"top": [], "qlm": [], "base": []})
            continue
        q = gen.tokenizer(r["q"], add_special_tokens=False)["input_ids"] + [gen.eos_ids[0]]
        top = np.argsort(-(r["X"] @ weights))[:TOP]
        pairs = [(prompt(r["sents"][r["si"][i]], r["cands"][i]), q) for i in top]
        qlm = [s for b in range(0, len(pairs), 12) for s in score(pairs[b : b + 12])]
        base = {si: score([(prompt(r["sents"][si], None), q)])[0] for si in {r["si"][i] for i in top}}
        out.append({"top": top.tolist(), "qlm": qlm, "base": [base[r["si"][i]] for i in top]})
        if n % 20 == 0:
            print(f"{n}/{len(rows)} questions, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def with_columns(rows: list[dict], scores: list[dict], columns: tuple[str, ...]) -> list[dict]:
    """The rows with ``columns`` (of qlm, qpmi) appended, filled as the reader fills ``lm``
    (``reader.fill_reranked``)."""
    from memchat.reader import fill_reranked

    out = []
    for r, s in zip(rows, scores):
        extra = np.zeros((len(r["X"]), 2))
        if s["top"]:
            qlm, base = np.array(s["qlm"]), np.array(s["base"])
            for c, v in enumerate((qlm, qlm - base)):
                fill_reranked(extra[:, c], np.array(s["top"]), v)
        keep = [c for c, name in enumerate(("qlm", "qpmi")) if name in columns]
        out.append({**r, "X": np.hstack([r["X"], extra[:, keep]])})
    return out


def alone(rows: list[dict], column: int, sets: list[str]) -> list[float]:
    """Per set, the mean F1 of the candidate that ``column`` alone ranks first (``fit_reader.quality`` with all
    the weight on that column)."""
    from fit_reader import quality

    w = np.zeros(rows[0]["X"].shape[1])
    w[column] = 1.0
    return [quality([r for r in rows if r["set"] == s], w)[0] for s in sets]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dump", required=True, help="a bench/fit_reader.py --dump file")
    p.add_argument("--scores", default="", help="save (or, if it exists, reuse) the question scores here")
    p.add_argument("--limit", type=int, default=0, help="first N questions per set")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from fit_reader import fit, kfold_f1, load_dump, quality

    from memchat.config import GenerationConfig, ReaderConfig
    from memchat.reader import FEATURES

    rows = load_dump(args.dump)
    if args.limit:
        rows = [r for s in dict.fromkeys(r["set"] for r in rows) for r in [x for x in rows if x["set"] == s][: args.limit]]
    shipped = np.asarray(ReaderConfig().weights)
    if args.scores and Path(args.scores).exists():
        scores = json.loads(Path(args.scores).read_text())
        if len(scores) != len(rows):
            sys.exit(f"reader_qlm: {args.scores} scores {len(scores)} questions, the dump (with --limit) has {len(rows)}")
    else:
        from memchat.generation import Generator

        scores = question_scores(Generator(GenerationConfig.model_name), rows, shipped)
        if args.scores:
            Path(args.scores).write_text(json.dumps(scores))
    sets = list(dict.fromkeys(r["set"] for r in rows))
    if sum(1 for r in rows if r["set"] == "squad2" and len(r["f1"])) < 4:
        sys.exit("reader_qlm: the fits need squad2 questions with candidates in the dump (at least 4; raise --limit)")
    print("span-choice F1 / contains; fitted on squad2 (its 2-fold figure held out), the other sets held out")
    print(f"{'columns added':16s} " + " ".join(f"{s:>14s}" for s in sets) + f" {'squad2 2-fold':>14s}")
    for columns in ((), ("qlm",), ("qpmi",), ("qlm", "qpmi")):
        part = with_columns(rows, scores, columns)
        train = [r for r in part if r["set"] == "squad2"]
        n = part[0]["X"].shape[1]
        w = fit(train, n)
        cells = [quality([r for r in part if r["set"] == s], w)[:2] for s in sets]
        folds = kfold_f1(train, lambda fold: fit(fold, n))
        print(f"{'+'.join(columns) or 'none (shipped)':16s} " + " ".join(f"{f:6.1f} / {c:5.1f}" for f, c in cells)
              + f" {folds:14.1f}")
    lm = FEATURES.index("lm")  # the answer likelihood the reader has, for comparison
    for name, part, column in (("qlm alone", with_columns(rows, scores, ("qlm",)), -1),
                               ("qpmi alone", with_columns(rows, scores, ("qpmi",)), -1), ("lm alone", rows, lm)):
        print(f"{name:16s} " + " ".join(f"{f:6.1f}        " for f in alone(part, column, sets)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
