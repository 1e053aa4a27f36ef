"""Closed-book answers by recitation: the fine-tuned model recites, the extractive reader picks the span.

    .venv/bin/python bench/recite.py --model-dir /tmp/ksq30/models/full --questions ../shared/data/qa_dev_squad2/qa.jsonl

The fine-tuned model answers a question with a sentence it learned (the training answers are sentences), so its
closed-book F1 is low even when the sentence holds the answer. "Recitation-augmented" answering (Sun et al. 2023,
arXiv 2210.01296) lets the model recite first and answer from the recitation. Here the recitations are the model's
greedy answer plus ``--samples`` sampled ones (each capped at ``--max-new-tokens``, as the closed-book eval), and
the answer is the reader's span of them (``reader.ExtractiveReader``, weights as shipped, its spans scored by the
fine-tuned or the base model: ``--scorer``): no document and no store is read, so it stays closed-book. Columns:

- greedy: the model's greedy answer as it is (the closed-book row of ``bench/knowledge.py``, the baseline);
- reader(greedy): the reader's span of the greedy answer;
- union contains: the gold answer inside any recitation (the ceiling of any span picker);
- reader(all), consistency w: the reader's span over every recitation's sentences, each sentence scored by the
  share of recitations it appears in, plus w x the share of recitations that contain the span.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--questions", required=True)
    p.add_argument("--samples", type=int, default=4, help="sampled recitations besides the greedy one")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--weights", default="0,1,2,4", help="consistency bonus weights to try")
    p.add_argument("--scorer", choices=("finetuned", "base"), default="finetuned",
                   help="the model that scores the reader's spans: the fine-tuned one, or the bundled base model")
    args = p.parse_args()

    import numpy as np
    import torch

    from memchat import text as T
    from memchat.chunking import split_sentences
    from memchat.config import ReaderConfig
    from memchat.evaluate import load_questions
    from memchat.finetuned import EVAL_REPETITION_PENALTY, FineTunedChat
    from memchat.rag import build_reader

    qs = load_questions(args.questions, limit=args.limit)
    chat = FineTunedChat(args.model_dir)
    gen = chat.generator
    t0 = time.perf_counter()
    greedy = chat.answer_many([q.question for q in qs], max_new_tokens=args.max_new_tokens)
    t1 = time.perf_counter()
    torch.manual_seed(0)
    sampled = gen.generate([chat.messages(q.question) for q in qs for _ in range(args.samples)],
                           max_new_tokens=args.max_new_tokens, temperature=args.temperature, do_sample=True,
                           repetition_penalty=EVAL_REPETITION_PENALTY, batch_size=16) if args.samples else []
    t2 = time.perf_counter()
    scorer = gen
    if args.scorer == "base":
        from memchat.generation import Generator

        scorer = Generator()
    reader = build_reader(scorer, None, ReaderConfig())
    weights = [float(w) for w in args.weights.split(",")]
    rows = {"greedy": [], "reader(greedy)": [], "union contains": []}
    rows |= {f"reader(all), consistency {w:g}": [] for w in weights}
    norm = T.normalize_answer

    for n, q in enumerate(qs):
        recs = [greedy[n]] + [r.text for r in sampled[n * args.samples:(n + 1) * args.samples]]
        golds = q.answers
        rows["greedy"].append((T.contains_gold(greedy[n], golds), T.token_f1(greedy[n], golds)))
        rows["union contains"].append((max(T.contains_gold(r, golds) for r in recs), 0.0))
        split = [split_sentences(x) or [x] for x in recs]  # each recitation's sentences; [0] is the greedy one's
        r = reader.read(q.question, split[0], [1.0] * len(split[0]))
        rows["reader(greedy)"].append((T.contains_gold(r.answer, golds), T.token_f1(r.answer, golds)))
        per_rec = [{norm(s): s for s in ss} for ss in split]
        sents = list({k: v for pr in per_rec for k, v in pr.items() if k}.values())
        share = [sum(norm(s) in pr for pr in per_rec) / len(recs) for s in sents]  # recitations holding it
        order = sorted(range(len(sents)), key=lambda i: -share[i])
        sents, share = [sents[i] for i in order], [share[i] for i in order]
        cands, X, _ = reader.scored(q.question, sents, share) if sents else ([], None, None)
        padded = [f" {norm(x)} " for x in recs]
        support = np.array([sum(f" {norm(sp.text)} " in x for x in padded) / len(recs) for _, sp in cands])
        for w in weights:
            pick = cands[int(np.argmax(X @ reader.w + w * support))][1].text if cands else ""
            rows[f"reader(all), consistency {w:g}"].append((T.contains_gold(pick, golds), T.token_f1(pick, golds)))
        if (n + 1) % 20 == 0:
            print(f"  {n + 1}/{len(qs)}", file=sys.stderr, flush=True)
    t3 = time.perf_counter()
    print(f"{len(qs)} questions, {args.model_dir}, spans scored by the {args.scorer} model; greedy {t1 - t0:.0f} s, "
          f"{args.samples} samples each {t2 - t1:.0f} s, reading {t3 - t2:.0f} s")
    print(f"{'column':40s} {'contains':>9s} {'F1':>6s}")
    for name, vals in rows.items():
        c = 100 * sum(v[0] for v in vals) / len(vals)
        f = 100 * sum(v[1] for v in vals) / len(vals)
        print(f"{name:40s} {c:9.1f} {'-' if name == 'union contains' else f'{f:.1f}':>6s}")


if __name__ == "__main__":
    main()
