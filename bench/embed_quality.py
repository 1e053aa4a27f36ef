"""Embedding backends side by side: speed, agreement, retrieval quality.

    python bench/embed_quality.py                      # torch, onnx, onnx-int8
    python bench/embed_quality.py --backends onnx onnx-int8 --repeats 3

Three measurements per backend, from one Embedder each (export time excluded):

  speed      chunks/s encoding ~500 naive 1000-character pieces of a real manual
             (R-intro.pdf), cut every 500 characters like an overlapping chunker.
  agreement  mean / min cosine of each backend's chunk vectors to the torch ones,
             and how many of each chunk's 5 nearest chunks are the same as torch's.
  retrieval  qa_dev: the corpus is every paragraph of contexts.jsonl, the queries
             are the questions of qa.jsonl; hit@1 / hit@3 of the gold paragraph
             (the one listing the question id) and of the gold document, and MRR.

The qa_dev set is small (49 questions, 10 paragraphs in 4 documents): one
question is 2 points of hit@k, so differences under ~4 points are noise.
Timings on a shared 2-core machine move by ~10% run to run; use --repeats.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from memchat.config import DEFAULT_EMBEDDING_MODEL  # noqa: E402
from memchat.embeddings import BACKENDS, Embedder  # noqa: E402

DATA = Path("/work/shared/data")


def manual_chunks(pdf: Path, n: int, size: int = 1000, stride: int = 500) -> list[str]:
    """Naive fixed-size pieces of a PDF's text, whitespace collapsed."""
    from pypdf import PdfReader

    text = " ".join(" ".join((page.extract_text() or "") for page in PdfReader(pdf).pages).split())
    return [text[i : i + size] for i in range(0, max(1, len(text) - size), stride)][:n]


def load_qa(folder: Path) -> tuple[list[dict], list[dict]]:
    """(paragraphs [{text, doc, qids}], questions [{id, question, doc}])."""
    paragraphs = []
    for line in (folder / "contexts.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        for text, qids in zip(record["paragraphs"], record["question_ids"]):
            paragraphs.append({"text": text, "doc": record["doc"], "qids": set(qids)})
    questions = [json.loads(line) for line in (folder / "qa.jsonl").read_text().splitlines() if line.strip()]
    return paragraphs, questions


def retrieval_scores(embedder: Embedder, paragraphs: list[dict], questions: list[dict]) -> dict:
    corpus = embedder.encode([p["text"] for p in paragraphs])  # (P, D)
    queries = embedder.encode([q["question"] for q in questions])  # (Q, D)
    ranking = np.argsort(-(queries @ corpus.T), axis=1, kind="stable")  # (Q, P), best first
    hits = {"para@1": 0, "para@3": 0, "doc@1": 0, "doc@3": 0}
    reciprocal = 0.0
    top1 = []
    for q, order in zip(questions, ranking):
        gold = [i for i, p in enumerate(paragraphs) if q["id"] in p["qids"]]
        rank = next(r for r, i in enumerate(order) if i in gold)
        docs = [paragraphs[i]["doc"] for i in order[:3]]
        hits["para@1"] += rank < 1
        hits["para@3"] += rank < 3
        hits["doc@1"] += docs[0] == q["doc"]
        hits["doc@3"] += q["doc"] in docs
        reciprocal += 1.0 / (rank + 1)
        top1.append(int(order[0]))
    n = len(questions)
    return {**{k: v / n for k, v in hits.items()}, "mrr": reciprocal / n, "top1": top1, "questions": n}


def throughput(embedder: Embedder, chunks: list[str], repeats: int) -> tuple[float, float, np.ndarray]:
    """(best chunks/s of wall time, CPU ms per chunk of that pass, vectors)."""
    embedder.encode(chunks[:8])  # warm-up: first-run allocations, lazy kernels
    best, cpu_ms, vectors = 0.0, 0.0, None
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        vectors = embedder.encode(chunks)
        speed = len(chunks) / (time.perf_counter() - start)
        if speed > best:  # CPU time counts all threads, spin-waits included: a cost, less load-sensitive than wall
            best, cpu_ms = speed, 1000 * (time.process_time() - cpu) / len(chunks)
    return best, cpu_ms, vectors


def neighbour_overlap(a: np.ndarray, b: np.ndarray, k: int = 5) -> float:
    """Mean fraction of each row's k nearest rows (self excluded) shared by the two embeddings."""
    def knn(x):
        sims = x @ x.T
        np.fill_diagonal(sims, -np.inf)
        return np.argsort(-sims, axis=1)[:, :k]

    na, nb = knn(a), knn(b)
    return float(np.mean([len(set(r) & set(s)) / k for r, s in zip(na, nb)]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_argument_group("Model")
    group.add_argument("--model", default=DEFAULT_EMBEDDING_MODEL, help="embedding model name or folder")
    group.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS, help="backends to compare")
    group.add_argument("--batch-size", type=int, default=32, help="texts per batch")
    group = parser.add_argument_group("Data")
    group.add_argument("--pdf", type=Path, default=DATA / "pdfs/manuals/R-intro.pdf", help="PDF cut into speed-test chunks")
    group.add_argument("--chunks", type=int, default=500, help="how many 1000-character chunks to time")
    group.add_argument("--qa", type=Path, default=DATA / "qa_dev", help="folder with contexts.jsonl and qa.jsonl")
    group = parser.add_argument_group("Run")
    group.add_argument("--repeats", type=int, default=1, help="timed passes per backend; the best counts")
    group.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    chunks = manual_chunks(args.pdf, args.chunks)
    paragraphs, questions = load_qa(args.qa)
    print(f"speed set: {len(chunks)} chunks of {args.pdf.name} (mean {np.mean([len(c) for c in chunks]):.0f} chars); "
          f"retrieval set: {len(questions)} questions over {len(paragraphs)} paragraphs")

    results, vectors = {}, {}
    for backend in args.backends:
        start = time.perf_counter()
        embedder = Embedder(args.model, backend=backend, batch_size=args.batch_size)
        load_s = time.perf_counter() - start
        if embedder.backend != backend:
            print(f"{backend}: fell back to {embedder.backend} ({embedder.fallback_reason})")
        speed, cpu_ms, vectors[backend] = throughput(embedder, chunks, args.repeats)
        results[backend] = {
            "load_s": load_s, "chunks_per_s": speed, "cpu_ms_per_chunk": cpu_ms,
            **retrieval_scores(embedder, paragraphs, questions),
        }
        print(f"{backend}: {speed:.1f} chunks/s ({cpu_ms:.0f} CPU-ms/chunk), ready in {load_s:.1f} s (any first-use export included)", flush=True)
        del embedder

    reference = "torch" if "torch" in vectors else args.backends[0]
    for backend, r in results.items():
        cos = (vectors[backend] * vectors[reference]).sum(1)
        r["cos_mean"], r["cos_min"] = float(cos.mean()), float(cos.min())
        r["knn5_overlap"] = neighbour_overlap(vectors[backend], vectors[reference])
        r["top1_agree"] = float(np.mean(np.array(r["top1"]) == np.array(results[reference]["top1"])))
    if "onnx" in vectors and "onnx-int8" in vectors:
        cos = (vectors["onnx-int8"] * vectors["onnx"]).sum(1)
        results["onnx-int8"]["cos_vs_onnx_mean"] = float(cos.mean())

    base = results[reference]["chunks_per_s"]
    print()
    if hasattr(os, "getloadavg"):  # contention explains slow runs on shared machines
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'backend':<10} {'chunks/s':>8} {'speedup':>7} {'cpu-ms':>6} {'cos mean':>8} {'cos min':>7} {'5nn ovl':>7} "
          f"{'para@1':>6} {'para@3':>6} {'doc@1':>6} {'doc@3':>6} {'MRR':>5} {'top1=':>5}")
    for backend, r in results.items():
        print(f"{backend:<10} {r['chunks_per_s']:>8.1f} {r['chunks_per_s'] / base:>6.2f}x {r['cpu_ms_per_chunk']:>6.0f} {r['cos_mean']:>8.4f} "
              f"{r['cos_min']:>7.4f} {r['knn5_overlap']:>7.3f} {r['para@1']:>6.3f} {r['para@3']:>6.3f} "
              f"{r['doc@1']:>6.3f} {r['doc@3']:>6.3f} {r['mrr']:>5.3f} {r['top1_agree']:>5.2f}")
    print(f"(cosine, 5-nn overlap and top-1 agreement are against {reference}; "
          f"speedup is chunks/s over {reference})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        clean = {b: {k: v for k, v in r.items() if k != "top1"} for b, r in results.items()}
        args.json.write_text(json.dumps({"model": args.model, "chunks": len(chunks), "results": clean}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
