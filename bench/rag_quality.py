"""RAG answer quality: the previous pipeline (baseline) vs extractive, generative + verification and auto.

    .venv/bin/python bench/rag_quality.py [--sets squad2,covid] [--limit N] [--generative-limit N]

For each dev set the PDFs go into a temporary store. Every row answers the set's
questions (answerable) and then the *other* set's questions asked of this store
(unanswerable: their documents are not in it; ``--unanswerable-from squad2=qa_dev``
picks another set, e.g. Wikipedia questions of a Wikipedia store), through ``memchat.evaluate`` so the
figures are the same ones ``test_finetuned_model.py --eval`` reports:

  baseline        the previous pipeline: dense retrieval only, the model writes the
                  answer, shown as is (no verification, no abstention)
  extractive      hybrid retrieval, the answer is a span picked by the reader
  generative+verify  hybrid retrieval, the model writes, the evidence must support it
  auto            the default: extractive for the bundled model, generative above 1B

Columns: passage recall@k (gold answer inside the k retrieved chunks, RAGConfig.top_k or --top-k), contains,
F1, EM, wrong-and-confident (answered with F1 < 0.2), abstention on answerable and
on unanswerable questions, p50/p95 seconds per question (one at a time, models
loaded). Rows that generate are slow on CPU: ``--generative-limit`` caps their
questions (the table says how many each row used).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"
SETS = {"qa_dev": DATA / "qa_dev", "squad2": DATA / "qa_dev_squad2", "covid": DATA / "qa_dev_covid"}
OTHER = {"squad2": "covid", "covid": "squad2", "qa_dev": "covid"}


def sample(questions, n, seed=0):
    if not n or n >= len(questions):
        return list(questions)
    rng = random.Random(seed)
    return sorted(rng.sample(list(questions), n), key=lambda q: questions.index(q))


def gate_spread(questions, rows) -> str:
    """The gate's score on answerable questions (min, 2nd, 5th percentile) and unanswerable ones (90th, 95th, max)."""
    import numpy as np

    ans = [r["relevance"] for q, r in zip(questions, rows) if "relevance" in r and not q.unanswerable]
    unans = [r["relevance"] for q, r in zip(questions, rows) if "relevance" in r and q.unanswerable]
    if not ans or not unans:
        return ""
    a, u = np.quantile(ans, [0, 0.02, 0.05]), np.quantile(unans, [0.9, 0.95, 1])
    return (f"answerable min {a[0]:.2f} p2 {a[1]:.2f} p5 {a[2]:.2f}   |   "
            f"unanswerable p90 {u[0]:.2f} p95 {u[1]:.2f} max {u[2]:.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", default="squad2,covid", help="comma-separated: qa_dev, squad2, covid")
    p.add_argument("--rows", default="baseline,extractive,generative+verify,auto", help="rows to run")
    p.add_argument("--limit", type=int, default=0, help="questions per set for the extractive/auto rows (0 = all)")
    p.add_argument("--generative-limit", type=int, default=40, help="questions per set for rows that generate")
    p.add_argument("--unanswerable-limit", type=int, default=60, help="unanswerable questions per set (0 = all)")
    p.add_argument("--model", default="Qwen/Qwen2.5-1.5B-Instruct", help="generation model (falls back to bundled)")
    p.add_argument("--top-k", default="", help="comma-separated chunks retrieved, each a row of its own "
                   "(default: RAGConfig.top_k)")
    p.add_argument("--chunk-size", default="", help="comma-separated chunk sizes in characters, each a store and "
                   "rows of its own; the overlap keeps ChunkConfig's share (default: ChunkConfig.chunk_size)")
    p.add_argument("--out", default="", help="write every report as JSON here")
    p.add_argument("--unanswerable-from", default="",
                   help="whose questions each store is asked as unanswerable, e.g. squad2=qa_dev,qa_dev=squad2 "
                        f"(default {','.join(f'{k}={v}' for k, v in OTHER.items())})")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    from memchat.config import ChunkConfig, GenerationConfig, RAGConfig
    from memchat.evaluate import EvalConfig, RAGSystem, evaluate, load_questions
    from memchat.generation import Generator
    from memchat.knowledge import KnowledgeBase
    from memchat.rag import RAGPipeline

    generator = Generator(args.model)
    row_names = args.rows.split(",")
    top_ks = [int(k) for k in args.top_k.split(",") if k] or [0]
    sizes = [int(c) for c in args.chunk_size.split(",") if c] or [0]
    table = []
    gates = []
    reports = {}
    others = {**OTHER, **dict(pair.split("=") for pair in args.unanswerable_from.split(",") if pair)}
    for name, size in [(n, c) for n in args.sets.split(",") for c in sizes]:
        with tempfile.TemporaryDirectory(prefix=f"memchat-rq-{name}-") as tmp:  # the store and its key go after
            chunking = ChunkConfig()
            if size:
                overlap = round(size * chunking.chunk_overlap / chunking.chunk_size)
                chunking = ChunkConfig(chunk_size=size, chunk_overlap=overlap)
            kb = KnowledgeBase(Path(tmp) / "store", chunking=chunking)
            t0 = time.perf_counter()
            kb.add_documents(sorted((SETS[name] / "pdfs").glob("*.pdf")))
            print(f"{name}: ingested in {time.perf_counter() - t0:.1f} s ({len(kb.chunks())} chunks of "
                  f"{chunking.chunk_size} characters)", file=sys.stderr)
            answerable = load_questions(SETS[name] / "qa.jsonl")
            unanswerable = sample(load_questions(SETS[others[name]] / "qa.jsonl", unanswerable=True),
                                  args.unanswerable_limit)
            for row, k in [(r, k) for r in row_names for k in top_ks]:
                cfg = RAGConfig(top_k=k or RAGConfig.top_k)
                mode = {"baseline": "generative", "extractive": "extractive", "generative+verify": "generative",
                        "auto": "auto"}[row]
                if row == "baseline":
                    cfg.retrieval, cfg.min_relevance, cfg.min_support = "dense", 0.0, 0.0
                rag = RAGPipeline(kb, generator, rag=cfg, mode=mode,
                                  generation=GenerationConfig(model_name=args.model, max_new_tokens=64))
                resolved = rag.resolved_mode()
                tags = [f"chunk {chunking.chunk_size}"] if len(sizes) > 1 else []
                tags += [f"k={cfg.top_k}"] if len(top_ks) > 1 else []
                with_k = lambda r: " ".join([r, *tags])  # noqa: E731
                label = with_k(row)
                same = next((m for n2, r, m in table if n2 == name and r == with_k(resolved) and row == "auto"), None)
                if same is not None:  # auto resolved to a row already measured: the same computation, not run twice
                    table.append((name, with_k(f"auto (= {resolved})"), same))
                    continue
                generates = resolved == "generative"
                n = args.generative_limit if generates else args.limit
                qs = sample(answerable, n) + sample(unanswerable, min(n, len(unanswerable)) if n else 0)
                rep = evaluate(qs, [RAGSystem(rag)], EvalConfig(systems=("rag",), top_k=cfg.top_k),
                               questions_file=f"{name}:{label}")
                m = rep.systems["rag"]["metrics"]
                reports[f"{name}:{label}"] = rep.to_dict()
                table.append((name, label, m))
                gates.append((name, label, cfg.min_relevance, gate_spread(qs, rep.rows["rag"])))
                print(f"  {label}: done ({rep.seconds:.0f} s)", file=sys.stderr)

    head = ["set", "row", "n (ans/unans)", "passage@k", "contains", "F1", "EM", "wrong+conf", "abstain (ans)",
            "abstain (unans)", "p50 s", "p95 s"]
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}"  # noqa: E731
    lines = [head]
    for name, row, m in table:
        lines.append([name, row, f"{m['questions'] - m['unanswerable_questions']}/{m['unanswerable_questions']}",
                      pct(m["passage_recall"]), pct(m["contains"]), pct(m["f1"]), pct(m["exact_match"]),
                      pct(m["wrong_and_confident"]), pct(m["abstention_rate"]), pct(m["unanswerable_abstained"]),
                      f"{m['latency_p50_s']:.2f}", f"{m['latency_p95_s']:.2f}"])
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    print(f"\nmodel: {generator.resolved.display_name}; latency per question, one at a time, models loaded")
    for r in lines:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print("\nthe abstention gate's score (rag.relevance: coverage + the top chunk's cosine), answerable questions' "
          "low percentiles against the unanswerable ones' high percentiles; the gap is where the threshold belongs")
    for name, row, threshold, spread in gates:
        if spread:
            print(f"  {name:8s} {row:12s} threshold {threshold:.2f}   {spread}")
    if args.out:
        Path(args.out).write_text(json.dumps(reports, indent=1, ensure_ascii=False, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
