"""How much should the fine-tuned model's draft move the extractive reader? The hybrid's vote, swept.

    .venv/bin/python bench/hybrid_vote.py --home /tmp/ksq --questions ../shared/data/qa_dev_squad2/qa.jsonl

``--home``: a MEMCHAT_HOME holding the set's store and a fine-tuned model in ``models/full``, as
``bench/knowledge.py`` leaves it. Each question is drafted once (greedy, as ``memchat.hybrid`` does), retrieved
the RAG way (the question) and the hybrid way (question and question + draft, fused), and its candidate spans
are scored once. Then, for each value of ``DRAFT_VOTE``, the span the hybrid would choose: the reader's score
plus vote x ``draft_trust`` x the span's token F1 with the draft. The baseline in the same run is RAG: plain
retrieval, no vote.

One approximation: the reader's LM columns are made once, for the 24 spans best by the reader's score plus the
largest vote's bonus, so every span a draft could lift is LM-scored; at a smaller vote the answer path would
LM-score the best 24 by that smaller bonus instead. Abstentions count as empty answers (F1 0).

``--signals``: can anything the fine-tuned model says about itself tell when its draft should move the reader? On
the hybrid's retrieval, the reader's best ``--signal-spans`` candidates, each against RAG in the same run:
  ft-base   the span's log p under the fine-tuned model minus under the RAG model (its base when both are the
            bundled SmolLM2), closed-book, after the question: what fine-tuning taught about that span;
  ft-null   the same fine-tuned log p minus its log p after NULL_QUESTION: what the question adds for that model;
  gated     the vote (--signal-vote x draft_trust x token F1 with the draft) only where the reader is unsure (its
            pick's softmax share below 0.3);
  confident the vote only for drafts whose mean token log p under their own model is above the median draft's.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", required=True, help="MEMCHAT_HOME with the store and models/full")
    p.add_argument("--questions", required=True, help="qa.jsonl of the set whose PDFs are in the store")
    p.add_argument("--model-dir", default="", help="the fine-tuned model (default: HOME/models/full)")
    p.add_argument("--votes", default="0,1,2,2.5,3,4,6,8", help="DRAFT_VOTE values to try")
    p.add_argument("--limit", type=int, default=0, help="first N questions")
    p.add_argument("--signals", action="store_true", help="also try the model-side signals (see above)")
    p.add_argument("--signal-spans", type=int, default=24, help="candidates per question the signals score")
    p.add_argument("--signal-vote", type=float, default=2.5, help="the vote the gated rows apply (2.5: the vote before)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["MEMCHAT_HOME"] = args.home

    from memchat.evaluate import EvalConfig, build_systems, load_questions
    from memchat.hybrid import DRAFT_VOTE, draft_trust
    from memchat.rag import ANSWERED
    from memchat.text import contains_gold, token_f1

    questions = load_questions(args.questions, limit=args.limit)
    model_dir = Path(args.model_dir or Path(args.home) / "models" / "full")
    systems, _, _ = build_systems(EvalConfig(systems=("hybrid",)), model_dir=model_dir)
    hybrid = systems[0].hybrid
    rag, reader = hybrid.rag, hybrid.rag.reader
    trust = draft_trust(hybrid.chat)
    votes = [float(v) for v in args.votes.split(",")]
    print(f"{len(questions)} questions, {model_dir}, draft_trust {trust:.3f}, DRAFT_VOTE now {DRAFT_VOTE}",
          file=sys.stderr)
    drafts = hybrid.drafts([q.question for q in questions])
    widest = max(votes) * trust

    def read(question: str, hits, draft: str):
        evidence = rag.select_evidence(question, hits)
        if rag.start(question, hits, evidence, {}, "extractive").status != ANSWERED:
            return None
        ev = evidence[: rag.cfg.reader_sentences]
        cands, X, bonus = reader.scored(question, [e.sentence for e in ev], [e.score for e in ev], hint=draft,
                                        hint_weight=widest)
        return [sp.text for _, sp in cands], X @ reader.w, bonus / widest if widest else bonus  # token F1 (0: no vote)

    def choose(read_out, weight: float) -> str:
        if read_out is None or not read_out[0]:
            return ""
        texts, base, f1 = read_out
        return texts[int(np.argmax(base + weight * f1))]

    rows = []
    for i, (q, d) in enumerate(zip(questions, drafts), 1):
        plain = read(q.question, rag.retrieve(q.question, rag.cfg.top_k), d)
        fused = read(q.question, hybrid.retrieve(q.question, d), d)
        rows.append((q, d, plain, fused))
        if i % 20 == 0:
            print(f"  {i}/{len(questions)}", file=sys.stderr)

    def score(texts):
        f1 = 100 * np.mean([token_f1(t, q.answers) for t, (q, *_) in zip(texts, rows)])
        cont = 100 * np.mean([contains_gold(t, q.answers) for t, (q, *_) in zip(texts, rows)])
        return f1, cont

    rag_f1, rag_cont = score([choose(plain, 0.0) for _, _, plain, _ in rows])
    draft_f1, draft_cont = score([d for _, d, _, _ in rows])
    print(f"\n{args.questions}: RAG (no draft) F1 {rag_f1:.1f} contains {rag_cont:.1f}; the drafts alone "
          f"(closed-book) F1 {draft_f1:.1f} contains {draft_cont:.1f}")
    print(f"{'':24s} {'fused retrieval (question + draft)':^34s} {'RAG retrieval (question only)':^34s}")
    print(f"{'DRAFT_VOTE':>10s} {'bonus at F1 1':>13s} " + f"{'hybrid F1':>9s} {'contains':>8s} {'vs RAG':>7s}        " * 2)
    for v in votes:
        line = f"{v:10.2f} {v * trust:13.2f} "
        for col in (3, 2):  # the fused reading, then the plain one: does the draft help retrieval, or only the vote?
            f1, cont = score([choose(r[col], v * trust) for r in rows])
            line += f"{f1:9.1f} {cont:8.1f} {f1 - rag_f1:+7.1f}        "
        print(line + ("<- now" if v == DRAFT_VOTE else ""))
    # Drafts that match a candidate span exactly: are they right where the reader is not?
    exact = [(q, d, plain) for q, d, plain, _ in rows if plain and len(plain[2]) and plain[2].max() >= 0.99]
    if exact:
        reader_f1 = 100 * np.mean([token_f1(choose(pl, 0.0), q.answers) for q, _, pl in exact])
        matched_f1 = 100 * np.mean([token_f1(pl[0][int(np.argmax(pl[2]))], q.answers) for q, _, pl in exact])
        print(f"\ndrafts matching a span exactly: {len(exact)} of {len(rows)}; that span's F1 {matched_f1:.1f}, "
              f"the reader's own pick's {reader_f1:.1f}")
    if args.signals:
        signals(rows, hybrid, rag_f1, args.signal_vote * trust, args.signal_spans)
    return 0


def signals(rows, hybrid, rag_f1: float, vote: float, n: int) -> None:
    """The --signals table (module docstring): F1 of each way of letting the model move the reader's pick."""
    from memchat.reader import NULL_QUESTION
    from memchat.text import token_f1

    chat, base = hybrid.chat, hybrid.rag.generator
    eos = chat.generator.tokenizer.eos_token or ""
    scored = []
    for q, d, _, fused in rows:
        if fused is None or not len(fused[0]):
            scored.append(None)
            continue
        texts, s, h = fused
        top = np.argsort(-s)[:n]
        cands = [texts[i] for i in top]
        asked = [(chat.messages(q.question), t + eos) for t in cands]
        *ft, draft_lp = chat.generator.loglikelihoods(asked + [(chat.messages(q.question), d.strip() + eos)])
        null = np.array(chat.generator.loglikelihoods([(chat.messages(NULL_QUESTION), t + eos) for t in cands]))
        bs = np.array(base.loglikelihoods(asked))
        p = np.exp(s[top] - s[top].max())
        n_tok = max(1, len(chat.generator.tokenizer(d.strip() + eos, add_special_tokens=False)["input_ids"]))
        scored.append({"q": q, "draft": d, "cands": cands, "s": s[top], "h": h[top], "ft": np.array(ft), "null": null,
                       "base": bs, "unsure": p.max() / p.sum() < 0.3, "confidence": draft_lp / n_tok})
    median = float(np.median([r["confidence"] for r in scored if r]))

    def f1_with(bonus) -> float:
        total = 0.0
        for r in scored:
            if r is not None:
                total += token_f1(r["cands"][int(np.argmax(r["s"] + bonus(r)))], r["q"].answers)
        return 100 * total / len(rows)

    print(f"\nsignals on the hybrid's retrieval, the reader's best {n} candidates (RAG F1 {rag_f1:.1f}; "
          f"the vote now {vote:.2f} at token F1 1)")
    print(f"{'signal':10s} {'weight':>7s} {'F1':>6s} {'vs RAG':>7s}")
    lines = [("ft-base", lam, lambda r, lam=lam: lam * (r["ft"] - r["base"])) for lam in (0.1, 0.5, 1.0)]
    lines += [("ft-null", lam, lambda r, lam=lam: lam * (r["ft"] - r["null"])) for lam in (0.1, 0.5, 1.0)]
    lines += [("gated", vote, lambda r: vote * r["h"] if r["unsure"] else 0.0),
              ("confident", vote, lambda r: vote * r["h"] if r["confidence"] > median else 0.0)]
    for name, weight, bonus in lines:
        f1 = f1_with(bonus)
        print(f"{name:10s} {weight:7.2f} {f1:6.1f} {f1 - rag_f1:+7.1f}")
    ranked = sorted((r for r in scored if r), key=lambda r: -r["confidence"])
    half = len(ranked) // 2
    for label, part in (("above", ranked[:half]), ("below", ranked[half:])):
        f1 = 100 * np.mean([token_f1(r["draft"], r["q"].answers) for r in part]) if part else 0.0
        print(f"drafts {label} the median confidence: {len(part)}, their closed-book F1 {f1:.1f}")


if __name__ == "__main__":
    raise SystemExit(main())
