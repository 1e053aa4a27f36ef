"""RAG answer quality on ../shared/data/qa_dev, side by side with the simplest RAG.

    .venv/bin/python bench/rag_quality.py [--limit N] [--model NAME]

Ingests the four qa_dev PDFs into a temporary store, then for each question prints:
  - doc hit@3: the gold document among the top-3 retrieved chunks;
  - for Mem_Chat's RAG (evidence sentences -> short answer + evidence line) and for a
    baseline "top-3 chunks pasted into the prompt" with the same two models:
    contains-gold of the answer alone and of what the user sees (answer + evidence),
    exact match and token F1 of the answer alone, and seconds per question.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
QA = REPO.parent / "shared" / "data" / "qa_dev"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=0, help="first N questions only (0 = all 49)")
    p.add_argument("--model", default="Qwen/Qwen2.5-1.5B-Instruct", help="generation model (falls back to bundled)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per generate call")
    p.add_argument("--out", default="", help="write per-question results as JSON here")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["MEMCHAT_HOME"] = tempfile.mkdtemp(prefix="memchat-quality-")

    from memchat.config import GenerationConfig
    from memchat.evaluate import contains_gold, exact_match, token_f1
    from memchat.generation import Generator
    from memchat.knowledge import KnowledgeBase
    from memchat.rag import SYSTEM_PROMPT, RAGPipeline

    qs = [json.loads(line) for line in (QA / "qa.jsonl").read_text().splitlines() if line.strip()]
    if args.limit:
        qs = qs[: args.limit]
    kb = KnowledgeBase()
    t0 = time.perf_counter()
    kb.add_documents(sorted((QA / "pdfs").glob("*.pdf")))
    print(f"ingested 4 PDFs in {time.perf_counter() - t0:.1f} s ({len(kb.chunks())} chunks)")
    gen = Generator(args.model)
    rag = RAGPipeline(kb, gen, generation=GenerationConfig(model_name=args.model))

    # Mem_Chat
    t0 = time.perf_counter()
    answers = rag.answer_many([q["question"] for q in qs], batch_size=args.batch_size)
    t_mem = (time.perf_counter() - t0) / len(qs)

    # Baseline: top-3 chunks pasted into the prompt, same models
    t0 = time.perf_counter()
    base_msgs = []
    for q in qs:
        hits = kb.search(q["question"], 3)
        ctx = "\n\n".join(h.text for h in hits)
        base_msgs.append([{"role": "system", "content": SYSTEM_PROMPT},
                          {"role": "user", "content": f"Context:\n{ctx}\n\nQuestion: {q['question']}\nAnswer:"}])
    base = gen.generate(base_msgs, max_new_tokens=rag.gen_cfg.max_new_tokens, batch_size=args.batch_size,
                        repetition_penalty=rag.gen_cfg.repetition_penalty)
    t_base = (time.perf_counter() - t0) / len(qs)

    rows = []
    for q, a, b in zip(qs, answers, base):
        golds = q["answers"]
        rows.append({
            "id": q["id"], "question": q["question"], "gold": golds,
            "doc_hit3": float(q["doc"] in [h.document for h in a.hits[:3]]),
            "answer": a.text, "evidence": a.evidence[0].sentence if a.evidence else "",
            "mem_contains_answer": contains_gold(a.text, golds),
            "mem_contains_shown": contains_gold(a.text + "\n" + a.evidence_line, golds),
            "mem_evidence_contains": contains_gold(a.evidence_line, golds),
            "mem_em": exact_match(a.text, golds), "mem_f1": token_f1(a.text, golds),
            "base_answer": b.text,
            "base_contains": contains_gold(b.text, golds),
            "base_em": exact_match(b.text, golds), "base_f1": token_f1(b.text, golds),
        })
    n = len(rows)
    mean = lambda k: sum(r[k] for r in rows) / n  # noqa: E731
    print(f"\nmodel: {gen.resolved.display_name}   questions: {n}")
    print(f"retrieval: gold document in top-3 = {mean('doc_hit3'):.1%}")
    print(f"{'system':<34}{'contains':>10}{'EM':>8}{'F1':>8}{'s/question':>12}")
    print(f"{'baseline (top-3 chunks pasted)':<34}{mean('base_contains'):>10.1%}{mean('base_em'):>8.1%}{mean('base_f1'):>8.2f}{t_base:>12.2f}")
    print(f"{'Mem_Chat answer alone':<34}{mean('mem_contains_answer'):>10.1%}{mean('mem_em'):>8.1%}{mean('mem_f1'):>8.2f}{t_mem:>12.2f}")
    print(f"{'Mem_Chat evidence line alone':<34}{mean('mem_evidence_contains'):>10.1%}")
    print(f"{'Mem_Chat as shown (answer+evidence)':<34}{mean('mem_contains_shown'):>10.1%}")
    print(f"ratio shown/baseline contains: {mean('mem_contains_shown') / max(mean('base_contains'), 1e-9):.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
