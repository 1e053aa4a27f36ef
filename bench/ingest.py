"""Ingest throughput: PDFs -> a FAISS store on disk, Mem_Chat vs LangChain vs raw encode.

    .venv/bin/python bench/ingest.py                      # everything: ~4-5 min on an idle 2-core machine
    .venv/bin/python bench/ingest.py --backends onnx-int8 --skip-raw
    .venv/bin/python bench/ingest.py --profile            # + cProfile of Mem_Chat's ingest

Rows, all on the same PDFs (default: ../shared/data/pdfs/manuals and papers_tables),
each pipeline in its own fresh process, models loaded and warmed up before the clock
starts (load time, including a first ONNX export, is reported in its own column):

  memchat [BACKEND]  KnowledgeBase.add_documents into an encrypted store in a temp dir:
                     pypdf + cleaning, chunking, embedding, one atomic encrypted commit.
  langchain          PyPDFLoader -> RecursiveCharacterTextSplitter (same chunk size and
                     overlap) -> HuggingFaceEmbeddings (the same bundled MiniLM folder,
                     fp32 torch) -> FAISS.from_documents -> save_local (not encrypted).
  raw encode         SentenceTransformer.encode (fp32 torch) of LangChain's chunks alone
                     (Mem_Chat's when the extras are missing): the embedding floor.

Then retrieval quality per pipeline on ../shared/data/qa_dev: the gold document among the
top-k chunks (KnowledgeBase.search for Mem_Chat), on the qa_dev PDFs alone and with the
benchmark corpus added as distractors; and each backend's vectors against fp32 torch's
on the same chunks (cosine).

The LangChain extras live outside the venv (they would downgrade huggingface_hub):
    .venv/bin/pip install -q --no-deps --target .cache/bench-site -r requirements-bench.txt
Not a test: numbers depend on the machine and its load; compare ratios within one run
(the CPU-seconds columns are the steadier ones on a shared machine).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    INSTALL_EXTRAS,
    REPO,
    SHARED_DATA,
    bundled_minilm_dir,
    cpu_note,
    emit,
    extras_missing,
    pin_cpus,
    run_worker,
    say,
    table,
)

sys.path.insert(0, str(REPO))  # `python bench/ingest.py` from anywhere imports this checkout's memchat

DEFAULT_PDF_DIRS = [SHARED_DATA / "pdfs" / "manuals", SHARED_DATA / "pdfs" / "papers_tables"]
QA_DIR = SHARED_DATA / "qa_dev"
BACKENDS = ("onnx-int8", "onnx", "torch")
WARMUP_TEXTS = [  # mixed lengths so the warm-up touches short and full-window shapes
    "warm up",
    "The rock cycle illustrates the transitions among the three types of rock. " * 3,
    "R is an integrated suite of software facilities for data manipulation, calculation and display. " * 12,
] * 11
TARGET_RATIO = 1.5  # issue 2: Mem_Chat pages/s >= 1.5x LangChain's


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("What to ingest")
    g.add_argument("--pdfs", nargs="+", default=[str(d) for d in DEFAULT_PDF_DIRS],
                   help="PDF files or folders (default: shared manuals + papers_tables)")
    g.add_argument("--qa-dir", default=str(QA_DIR), help="qa_dev folder (qa.jsonl with a 'doc' field, pdfs/)")
    g = p.add_argument_group("Which rows")
    g.add_argument("--backends", default=",".join(BACKENDS), help="Mem_Chat embedding backends, comma-separated")
    g.add_argument("--skip-langchain", action="store_true", help="leave out the LangChain row")
    g.add_argument("--skip-raw", action="store_true", help="leave out the raw sentence-transformers encode row")
    g.add_argument("--skip-quality", action="store_true", help="leave out retrieval quality (saves ~10 s per row)")
    g = p.add_argument_group("Settings")
    g.add_argument("--chunk-size", type=int, default=None, help="characters (default: ChunkConfig's)")
    g.add_argument("--chunk-overlap", type=int, default=None, help="characters (default: ChunkConfig's)")
    g.add_argument("--batch-size", type=int, default=None, help="embedding batch (default: EmbeddingConfig's, for every row)")
    g.add_argument("--repeat", type=int, default=1,
                   help="rounds over all rows, interleaved; each row's fastest counts (the machine is shared)")
    g.add_argument("--fresh-export", action="store_true",
                   help="export/quantise ONNX into an empty cache, so the load column shows the one-off export cost")
    g.add_argument("--profile", action="store_true",
                   help="also profile the first Mem_Chat backend's ingest (an extra, untimed run); print the top functions")
    g.add_argument("--json", help="also write all results to this JSON file")
    p.add_argument("--cpus", type=int, default=0,
                   help="pin every pipeline to this many CPUs (0 = all); 1 gives steadier ratios on a busy machine")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)  # internal: run one pipeline, print JSON
    return p.parse_args(argv)


def pdf_paths(items: list[str]) -> list[str]:
    out: list[str] = []
    for item in items:
        path = Path(item)
        out += sorted(glob.glob(str(path / "*.pdf"))) if path.is_dir() else [str(path)]
    if not out:
        sys.exit(f"bench: no PDFs found in {' '.join(items)}")
    return out


# ---------------------------------------------------------------------------
# Workers (each runs in its own process)
# ---------------------------------------------------------------------------
def _qa(qa_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (qa_dir / "qa.jsonl").read_text().splitlines() if line.strip()]


def _hits(rank_docs: list[list[str]], questions: list[dict]) -> dict:
    """rank_docs[i] = documents of question i's top chunks, best first."""
    n = len(questions)
    return {
        "hit@1": sum(q["doc"] in docs[:1] for q, docs in zip(questions, rank_docs)) / n,
        "hit@3": sum(q["doc"] in docs[:3] for q, docs in zip(questions, rank_docs)) / n,
        "n": n,
    }


def worker_memchat(backend: str, pdfs: list[str], opts: dict, workdir: Path) -> dict:
    import logging

    logging.basicConfig(level=logging.WARNING, format="  [%(name)s] %(message)s")
    import numpy as np

    from memchat import chunking, pdf
    from memchat.config import ChunkConfig, EmbeddingConfig
    from memchat.embeddings import Embedder
    from memchat.knowledge import KnowledgeBase

    ccfg = ChunkConfig()
    ccfg.chunk_size = opts["chunk_size"] or ccfg.chunk_size
    ccfg.chunk_overlap = opts["chunk_overlap"] if opts["chunk_overlap"] is not None else ccfg.chunk_overlap
    ecfg = EmbeddingConfig(backend=backend)
    ecfg.batch_size = opts["batch_size"] or ecfg.batch_size

    t0 = time.perf_counter()
    embedder = Embedder(ecfg.model_name, backend=backend, batch_size=ecfg.batch_size, max_seq_length=ecfg.max_seq_length)
    load_s = time.perf_counter() - t0
    embedder.encode(WARMUP_TEXTS)  # first-run allocations and kernel choices, off the clock

    # Stage timers: wrap the functions knowledge.py calls (it imports them at call time).
    stages = {"extract": 0.0, "chunk": 0.0, "embed": 0.0, "commit": 0.0}
    vectors: list = []

    def timed(stage, fn, keep=False):
        def wrapper(*a, **k):
            s = time.perf_counter()
            out = fn(*a, **k)
            stages[stage] += time.perf_counter() - s
            if keep:
                vectors.append(out)
            return out
        return wrapper

    extract_pdf, chunk_pages = pdf.extract_pdf, chunking.chunk_pages
    pdf.extract_pdf = timed("extract", extract_pdf)
    chunking.chunk_pages = timed("chunk", chunk_pages)
    embedder.encode = timed("embed", embedder.encode, keep=True)

    store_dir = workdir / f"store-{backend}-{opts['round']}"
    kb = KnowledgeBase(store_dir, chunking=ccfg, embedding=ecfg, embedder=embedder)
    kb._merge = timed("commit", kb._merge)  # lock, re-read, merge, serialize, encrypt, atomic write
    t0, c0 = time.perf_counter(), time.process_time()
    results = kb.add_documents(pdfs)
    seconds, cpu_s = time.perf_counter() - t0, time.process_time() - c0

    # Off the clock from here: put the real functions back.
    del kb._merge, embedder.encode
    pdf.extract_pdf, chunking.chunk_pages = extract_pdf, chunk_pages
    if opts["profile"]:  # an extra, untimed run: cProfile's overhead must not touch the figures
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        KnowledgeBase(workdir / f"store-{backend}-profile", chunking=ccfg, embedding=ecfg, embedder=embedder).add_documents(pdfs)
        profiler.disable()
        _print_profile(profiler)

    errors = [r.message for r in results if r.status == "error"]
    for e in errors:
        say(f"  memchat[{backend}]: {e}")
    pages = sum(r.pages for r in results if r.status in ("added", "updated"))
    chunks = sum(r.chunks for r in results if r.status in ("added", "updated"))
    stored = sum(f.stat().st_size for f in store_dir.iterdir() if f.is_file())
    all_vectors = np.concatenate(vectors) if vectors else np.zeros((0, embedder.dim), np.float32)
    np.save(workdir / f"vectors-{backend}.npy", all_vectors)  # compared with torch's by the parent
    (workdir / "chunks-memchat.json").write_text(json.dumps([c["text"] for c in kb.chunks()]))

    result = {
        "name": f"memchat [{embedder.backend}]", "backend": embedder.backend, "pages": pages, "chunks": chunks,
        "seconds": seconds, "cpu_s": cpu_s, "load_s": load_s, "exported": embedder.exported, "stages": stages,
        "store_bytes": stored, "errors": errors,
    }
    if not opts["skip_quality"]:
        result["quality"] = _memchat_quality(embedder, ecfg, ccfg, Path(opts["qa_dir"]), workdir, kb)
    return result


def _memchat_quality(embedder, ecfg, ccfg, qa_dir: Path, workdir: Path, corpus_kb) -> dict:
    from memchat.knowledge import KnowledgeBase

    questions = _qa(qa_dir)
    qa_pdfs = sorted(str(p) for p in (qa_dir / "pdfs").glob("*.pdf"))
    alone_dir = workdir / f"qa-{embedder.backend}-{uuid.uuid4().hex[:8]}"
    alone = KnowledgeBase(alone_dir, chunking=ccfg, embedding=ecfg, embedder=embedder)
    alone.add_documents(qa_pdfs)
    corpus_kb.add_documents(qa_pdfs)  # the benchmark corpus stays in as distractors
    out = {}
    for label, kb in (("alone", alone), ("distractors", corpus_kb)):
        ranks = [[h.document for h in kb.search(q["question"], k=3)] for q in questions]
        out[label] = _hits(ranks, questions) | {"chunks": len(kb.chunks())}
    return out


def _print_profile(profiler) -> None:
    import io
    import pstats

    buf = io.StringIO()
    stats = pstats.Stats(profiler, stream=buf).strip_dirs().sort_stats("tottime")
    stats.print_stats(18)
    say("\ncProfile of Mem_Chat's ingest, by own time (tottime):\n" + buf.getvalue().split("\n", 4)[-1])


def worker_langchain(pdfs: list[str], opts: dict, workdir: Path) -> dict:
    import warnings

    warnings.simplefilter("ignore")
    from langchain_community.document_loaders import PyPDFLoader
    from langchain_community.vectorstores import FAISS
    from langchain_community.vectorstores.utils import DistanceStrategy
    from langchain_huggingface import HuggingFaceEmbeddings
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    from memchat.config import ChunkConfig, EmbeddingConfig

    ccfg, ecfg = ChunkConfig(), EmbeddingConfig()
    size = opts["chunk_size"] or ccfg.chunk_size
    overlap = opts["chunk_overlap"] if opts["chunk_overlap"] is not None else ccfg.chunk_overlap
    t0 = time.perf_counter()
    embeddings = HuggingFaceEmbeddings(
        model_name=str(bundled_minilm_dir()),
        model_kwargs={"device": "cpu"},
        encode_kwargs={"normalize_embeddings": True, "batch_size": opts["batch_size"] or ecfg.batch_size},
    )
    load_s = time.perf_counter() - t0
    embeddings.embed_documents(WARMUP_TEXTS)
    splitter = RecursiveCharacterTextSplitter(chunk_size=size, chunk_overlap=overlap)

    def ingest(paths, out_dir):
        pages = [page for path in paths for page in PyPDFLoader(path).load()]  # one Document per page
        chunks = splitter.split_documents(pages)
        store = FAISS.from_documents(chunks, embeddings, distance_strategy=DistanceStrategy.MAX_INNER_PRODUCT)
        store.save_local(str(out_dir))
        return pages, chunks, store

    out_dir = workdir / f"langchain-store-{opts['round']}"
    t0, c0 = time.perf_counter(), time.process_time()
    pages, chunks, store = ingest(pdfs, out_dir)
    seconds, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    (workdir / "chunks-langchain.json").write_text(json.dumps([c.page_content for c in chunks]))
    stored = sum(f.stat().st_size for f in out_dir.iterdir())
    result = {"name": "langchain", "backend": "torch", "pages": len(pages), "chunks": len(chunks), "seconds": seconds,
              "cpu_s": cpu_s, "load_s": load_s, "exported": False, "store_bytes": stored, "errors": []}
    if not opts["skip_quality"]:
        qa_dir = Path(opts["qa_dir"])
        questions = _qa(qa_dir)
        qa_pdfs = sorted(str(p) for p in (qa_dir / "pdfs").glob("*.pdf"))
        _, qa_chunks, alone = ingest(qa_pdfs, workdir / "langchain-qa-a")
        _, _, more = ingest(qa_pdfs, workdir / "langchain-qa-b")
        store.merge_from(more)  # corpus + qa_dev, as for Mem_Chat
        result["quality"] = {}
        for label, s in (("alone", alone), ("distractors", store)):
            ranks = [[Path(d.metadata["source"]).name for d in s.similarity_search(q["question"], k=3)] for q in questions]
            result["quality"][label] = _hits(ranks, questions) | {"chunks": s.index.ntotal}
    return result


def worker_raw(chunks_file: Path, pages: int, opts: dict) -> dict:
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from memchat.config import EmbeddingConfig

    texts = json.loads(chunks_file.read_text())
    t0 = time.perf_counter()
    model = SentenceTransformer(str(bundled_minilm_dir()), device="cpu")
    load_s = time.perf_counter() - t0
    model.encode(WARMUP_TEXTS)
    t0, c0 = time.perf_counter(), time.process_time()
    vectors = model.encode(texts, batch_size=opts["batch_size"] or EmbeddingConfig().batch_size, normalize_embeddings=True)
    seconds, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    assert vectors.shape[0] == len(texts) and np.isfinite(vectors).all()
    source = "langchain" if "langchain" in chunks_file.name else "memchat"
    return {"name": f"raw encode ({source} chunks)", "backend": "torch", "pages": pages, "chunks": len(texts),
            "seconds": seconds, "cpu_s": cpu_s, "load_s": load_s, "exported": False, "store_bytes": 0, "errors": []}


def run_as_worker(args: argparse.Namespace) -> int:
    pin_cpus()
    kind, workdir, opts = args.worker[0], Path(args.worker[1]), json.loads(args.worker[2])
    if kind == "memchat":
        emit(worker_memchat(args.worker[3], opts["pdfs"], opts, workdir))
    elif kind == "langchain":
        emit(worker_langchain(opts["pdfs"], opts, workdir))
    elif kind == "raw":
        emit(worker_raw(Path(args.worker[3]), int(args.worker[4]), opts))
    return 0


# ---------------------------------------------------------------------------
# The parent: run the rows, print the tables
# ---------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_as_worker(args)

    from memchat.config import ChunkConfig, EmbeddingConfig

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    pdfs = pdf_paths(args.pdfs)
    ccfg, ecfg = ChunkConfig(), EmbeddingConfig()
    opts = {
        "pdfs": pdfs, "qa_dir": args.qa_dir, "skip_quality": args.skip_quality, "profile": False,
        "round": 0, "chunk_size": args.chunk_size, "chunk_overlap": args.chunk_overlap, "batch_size": args.batch_size,
    }
    missing = None if args.skip_langchain else extras_missing()
    if missing:
        print(f"bench: LangChain extras not importable ({missing}).\n"
              f"  Install them (outside the venv, no dependency resolution) with:\n    {INSTALL_EXTRAS}\n"
              "  Running without the LangChain row.\n", flush=True)

    import pypdf

    n_pages = sum(len(pypdf.PdfReader(p).pages) for p in pdfs)
    print(f"ingest bench: {len(pdfs)} PDFs, {n_pages} pages ({', '.join(Path(p).name for p in pdfs)})")
    print(f"settings: chunk_size {args.chunk_size or ccfg.chunk_size}, overlap "
          f"{args.chunk_overlap if args.chunk_overlap is not None else ccfg.chunk_overlap}, embedding batch "
          f"{args.batch_size or ecfg.batch_size}, max_seq_length {ecfg.max_seq_length}, model {ecfg.model_name} "
          f"(bundled: {bundled_minilm_dir()}); {cpu_note(args.cpus)}", flush=True)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="memchat-ingest-bench-") as tmp:
        work = Path(tmp)
        env = {"MEMCHAT_HOME": str(work / "home"), "MEMCHAT_BENCH_CPUS": str(args.cpus)}
        if args.fresh_export:
            env["MEMCHAT_CACHE_DIR"] = str(work / "cache")
        best: dict[str, dict] = {}  # row key -> fastest result (quality kept from round 1)

        def run(key, script_args, extras=False):
            result = run_worker("ingest.py", script_args, extras=extras, **env)
            _report(result)
            if key not in best or result["seconds"] < best[key]["seconds"]:
                result.setdefault("quality", best.get(key, {}).get("quality"))
                best[key] = result

        for rnd in range(max(1, args.repeat)):  # rounds interleave the rows, so load swings hit them all
            o = dict(opts, round=rnd, skip_quality=args.skip_quality or rnd > 0)
            if not missing and not args.skip_langchain:
                say(f"round {rnd + 1}: running langchain ...")
                run("langchain", ["langchain", tmp, json.dumps(o)], extras=True)
            for i, backend in enumerate(backends):
                say(f"round {rnd + 1}: running memchat [{backend}] ...")
                ob = dict(o, profile=args.profile and i == 0 and rnd == 0)
                run(f"memchat-{backend}", ["memchat", tmp, json.dumps(ob), backend])
            if not args.skip_raw:
                chunks_file = work / ("chunks-langchain.json" if (work / "chunks-langchain.json").exists() else "chunks-memchat.json")
                if chunks_file.exists():
                    say(f"round {rnd + 1}: running raw encode of {chunks_file.name} ...")
                    run("raw", ["raw", tmp, json.dumps(o), str(chunks_file), str(n_pages)])
        rows = list(best.values())
        cosines = _cosines(work, [r["backend"] for r in rows if r["name"].startswith("memchat")])
    _print_tables(rows, cosines, args.skip_quality)
    print(f"\ntotal bench time {time.perf_counter() - started:.0f} s; load avg now {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "cosine_vs_torch": cosines}, indent=1))
    return 0


def _report(r: dict) -> None:
    say(f"  {r['name']}: {r['pages']} pages, {r['chunks']} chunks in {r['seconds']:.1f} s "
        f"({r['pages'] / r['seconds']:.1f} pages/s); load {r['load_s']:.1f} s")


def _cosines(work: Path, backends: list[str]) -> dict:
    """Each backend's vectors vs fp32 torch's, row by row (same chunks: chunking is deterministic)."""
    import numpy as np

    ref_file = work / "vectors-torch.npy"
    if not ref_file.exists():
        return {}
    ref = np.load(ref_file)
    out = {}
    for b in backends:
        v = np.load(work / f"vectors-{b}.npy")
        if v.shape != ref.shape:
            continue
        cos = (v * ref).sum(1)
        out[b] = {"mean": float(cos.mean()), "min": float(cos.min()), "n": int(len(cos))}
    return out


def _print_tables(rows: list[dict], cosines: dict, skip_quality: bool) -> None:
    lc = next((r for r in rows if r["name"] == "langchain"), None)
    body = []
    for r in rows:
        pps = r["pages"] / r["seconds"]
        ratio = f"{pps / (lc['pages'] / lc['seconds']):.2f}x" if lc else "n/a"
        load = f"{r['load_s']:.1f}" + (" (export)" if r["exported"] else "")
        cpu_ratio = f"{(lc['cpu_s'] / lc['pages']) / (r['cpu_s'] / r['pages']):.2f}x" if lc else "n/a"
        body.append([r["name"], r["pages"], r["chunks"], f"{r['seconds']:.1f}", f"{pps:.1f}",
                     f"{r['chunks'] / r['seconds']:.1f}", ratio, f"{r['cpu_s']:.1f}", cpu_ratio, load])
    print()
    print(table(["pipeline", "pages", "chunks", "seconds", "pages/s", "chunks/s", "vs langchain", "cpu s", "cpu vs lc",
                 "load s (untimed)"],
                body, "Ingest throughput (PDF -> store on disk; models warm; load time not in 'seconds'; "
                "cpu = this process's CPU seconds, 'cpu vs lc' = LangChain's CPU per page / this row's)"))
    best = [r for r in rows if r["name"].startswith("memchat")]
    if lc and best:
        default = best[0]
        ratio = (default["pages"] / default["seconds"]) / (lc["pages"] / lc["seconds"])
        verdict = "meets" if ratio >= TARGET_RATIO else "MISSES"
        print(f"target: {default['name']} pages/s >= {TARGET_RATIO}x langchain: {ratio:.2f}x, {verdict} the target")
    raw = next((r for r in rows if r["name"].startswith("raw")), None)
    if lc and raw and "langchain" in raw["name"]:
        print(f"langchain spends {lc['seconds'] / raw['seconds']:.2f}x the raw fp32 encode time of its own chunks")

    if best:
        print()
        print(table(
            ["pipeline", "extract s", "chunk s", "embed s", "commit s", "other s", "embed share", "store MB"],
            [[r["name"], *(f"{r['stages'][k]:.2f}" for k in ("extract", "chunk", "embed", "commit")),
              f"{r['seconds'] - sum(r['stages'].values()):.2f}", f"{100 * r['stages']['embed'] / r['seconds']:.0f}%",
              f"{r['store_bytes'] / 1e6:.1f}"] for r in best],
            "Mem_Chat stages (commit = lock, merge, serialize, encrypt, atomic write of the three files)"))

    if not skip_quality:
        print()
        qrows = []
        for r in rows:
            q = r.get("quality")
            if not q:
                continue
            cos = cosines.get(r["backend"]) if r["name"].startswith("memchat") else None
            qrows.append([r["name"], f"{q['alone']['hit@1']:.3f}", f"{q['alone']['hit@3']:.3f}",
                          f"{q['distractors']['hit@1']:.3f}", f"{q['distractors']['hit@3']:.3f}",
                          q["distractors"]["chunks"],
                          f"{cos['mean']:.4f} / {cos['min']:.4f}" if cos else "-"])
        n = next((r["quality"]["alone"]["n"] for r in rows if r.get("quality")), 0)
        print(table(["pipeline", "hit@1", "hit@3", "hit@1 +corpus", "hit@3 +corpus", "chunks searched",
                     "cosine vs torch mean / min"], qrows,
                    f"Retrieval quality on qa_dev ({n} questions; gold document in the top k chunks; "
                    "'+corpus' = the benchmark PDFs added as distractors)"))


if __name__ == "__main__":
    sys.exit(main())
