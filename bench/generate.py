"""Generation speed for extract_faiss_data.py: batched vs one prompt at a time, and the extraction's overhead.

    .venv/bin/python bench/generate.py                        # both parts, ~3-4 min on 2 idle cores
    .venv/bin/python bench/generate.py --skip-extraction      # part 1 only
    .venv/bin/python bench/generate.py --chunks 4 --prompts 8 --max-new-tokens 48   # quicker
    .venv/bin/python bench/generate.py --out bench/out/generate.json

One process, the bundled SmolLM2-135M-Instruct (or --model), loaded and warmed up
before any clock starts, on the qa_dev PDFs put in a temporary knowledge base:

  1. batched vs loop   the same prompts, greedy, same max_new_tokens: one
                       ``Generator.generate`` call at --batch-size, then a loop of
                       one-prompt calls. Generated tokens/s of each and the ratio
                       (target >= 6x at batch 16), and how many outputs are
                       identical between the two (left padding can flip a greedy
                       token through float noise). Two prompt sets:
                         short   one-line requests (~35 prompt tokens): decode-bound,
                                 what batching itself buys;
                         answer  the extractor's answer prompts (question + the
                                 chunk's best sentences, ~150-200 prompt tokens).
                       The prompt's prefill costs the same in both paths, so on
                       long prompts it caps the ratio: (P + D x t1) / (P + D x t16).
  2. extraction        ``FAISSDataExtractor`` on --chunks chunks, every generate call
                       recorded; then the same calls replayed bare. Extraction wall
                       time / bare generation time for the same prompts (target <=
                       1.3x): what parsing, filtering, embedding and file writing cost.
                       Then (unless --no-writers) the same chunks again with the model
                       writing answers and paraphrases and no spare retry sentences (the
                       path before small models got sentence answers and framings without
                       those stages, and the retry its spare sentence): seconds per
                       chunk, questions kept per chunk, seconds by stage, and whether the
                       records are the same, in one run. That run uses --baseline-dtype
                       (float32, the CPU dtype before); where today's dtype differs (bf16 on
                       a CPU with bf16 instructions) today's path also runs in it, so each
                       change's share is its own row.
  4. shared prefix     a chunk's answer stage, --pairs questions per chunk on
                       --prefix-chunks chunks, three ways: today's prompts (each
                       question with its own best sentences of the chunk), the whole
                       chunk as every question's text, and the same with
                       ``generate(share_prefix=True)`` (the chunk prefilled once per
                       chunk, not once per question). Seconds per chunk, prompt
                       tokens, prefill tokens saved, identical outputs.
  3. external engine   (with --llm-server URL) the same extraction through an
                       OpenAI-compatible server via ``LLMServerClient`` (concurrent
                       requests; the server batches them), against part 2's in-process
                       run: seconds per chunk and questions kept per chunk. URL "self"
                       starts ``main.py serve`` here on the same model (the API path's
                       cost on CPU); on a GPU box point it at ``vllm serve MODEL``.

Not a test: numbers depend on the machine and its load (shown); compare ratios within one run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SHARED_DATA, cpu_note, say, table  # noqa: E402

sys.path.insert(0, str(REPO))

QA_PDFS = sorted((SHARED_DATA / "qa_dev" / "pdfs").glob("*.pdf"))


class Recorder:
    """Wraps a Generator; remembers every generate call (prompts and settings) for the bare replay."""

    def __init__(self, inner, force: dict | None = None):
        self.inner = inner
        self.force = force or {}  # settings added to every call (part 2 with --share-prefix)
        self.calls: list[tuple[list, dict]] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, batch, **kwargs):
        kwargs = {**kwargs, **self.force}
        self.calls.append((list(batch), dict(kwargs)))
        return self.inner.generate(batch, **kwargs)


SHORT_TOPICS = "rocks rivers primes television plates lakes deltas tests comets bridges maps books trains roads trees birds"


def prompt_set(name: str, chunks: list[dict], embedder, n: int) -> list[list[dict]]:
    """``n`` prompts of one kind: "short" requests, or "answer" prompts as the extractor writes them."""
    from memchat import qa
    from memchat.chunking import split_sentences

    if name == "short":
        topics = (SHORT_TOPICS.split() * 4)[:n]
        return [[{"role": "user", "content": f"Write three sentences about {t}."}] for t in topics]
    if name == "answer":
        import json

        questions = [json.loads(line) for line in open(SHARED_DATA / "qa_dev" / "qa.jsonl", encoding="utf-8")][:n]
        sentences = [s for c in chunks for s in split_sentences(c["text"])]
        svec = embedder.encode(sentences)
        out = []
        for q in questions:  # the 3 sentences closest to the question, ~the extractor's evidence
            qv = embedder.encode([q["question"]])[0]
            best = sorted(sorted(range(len(sentences)), key=lambda i: -float(svec[i] @ qv))[:3])
            out.append(qa.answer_prompt(q["question"], " ".join(sentences[i] for i in best)))
        return out
    raise SystemExit(f"unknown prompt set {name!r} (short, answer)")


def part_batched_vs_loop(gen, prompts, batch_size: int, max_new_tokens: int) -> dict:
    kw = dict(max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=1.1)
    t = time.perf_counter()
    batched = gen.generate(prompts, batch_size=batch_size, **kw)
    t_batched = time.perf_counter() - t
    say(f"  batched: {sum(r.new_tokens for r in batched)} tokens in {t_batched:.1f} s")
    t = time.perf_counter()
    single = [gen.generate([p], batch_size=1, **kw)[0] for p in prompts]
    t_loop = time.perf_counter() - t
    say(f"  loop:    {sum(r.new_tokens for r in single)} tokens in {t_loop:.1f} s")
    tok_b, tok_l = sum(r.new_tokens for r in batched), sum(r.new_tokens for r in single)
    return {
        "prompts": len(prompts),
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "batched_tokens": tok_b,
        "batched_s": round(t_batched, 2),
        "batched_tok_s": round(tok_b / t_batched, 1),
        "loop_tokens": tok_l,
        "loop_s": round(t_loop, 2),
        "loop_tok_s": round(tok_l / t_loop, 1),
        "speedup_tok_s": round((tok_b / t_batched) / (tok_l / t_loop), 2),
        "speedup_wall": round(t_loop / t_batched, 2),
        "identical_outputs": sum(a.text == b.text for a, b in zip(batched, single)),
    }


def part_extraction(kb, gen, embedder, chunks: int, pairs: int, batch_size: int, out_dir: Path,
                    force: dict | None = None, **settings) -> dict:
    from memchat.config import ExtractConfig
    from memchat.extraction import FAISSDataExtractor

    rec = Recorder(gen, force)
    cfg = ExtractConfig(max_pairs_per_chunk=pairs, batch_size=batch_size, max_chunks=chunks, **settings)
    ex = FAISSDataExtractor(kb, rec, embedder=embedder, extract_config=cfg, output_dir=out_dir, progress=False)
    gen.stats.reset()
    t = time.perf_counter()
    ex.create_training_dataset()
    wall = time.perf_counter() - t
    inside = gen.stats.seconds
    tokens = gen.stats.new_tokens
    say(f"  extraction: {wall:.1f} s wall, {inside:.1f} s inside generate, {tokens} tokens, {len(rec.calls)} calls")
    gen.stats.reset()
    t = time.perf_counter()
    for batch, kwargs in rec.calls:
        gen.generate(batch, **kwargs)
    bare = time.perf_counter() - t
    say(f"  bare replay: {bare:.1f} s, {gen.stats.new_tokens} tokens")
    o = ex.report.stats["overall"]
    doc = json.loads(Path(ex.report.dataset_path).read_text(encoding="utf-8"))
    contents = sorted((r["kind"], r.get("question", ""), r.get("answer", r.get("text", ""))) for r in doc["records"])
    paraphrases: dict = {}
    for r in doc["records"]:
        if r["kind"] == "variation":
            paraphrases[r["paraphrase_source"]] = paraphrases.get(r["paraphrase_source"], 0) + 1
    return {
        "chunks": chunks,
        "pairs_per_chunk": pairs,
        "generate_calls": len(rec.calls),
        "prompts": sum(len(b) for b, _ in rec.calls),
        "generated_tokens": tokens,
        "extraction_wall_s": round(wall, 2),
        "inside_generate_s": round(inside, 2),
        "bare_replay_s": round(bare, 2),
        "replay_tokens": gen.stats.new_tokens,
        "wall_over_bare": round(wall / bare, 3),
        "wall_over_inside": round(wall / inside, 3) if inside else None,
        "extraction_tok_s": round(tokens / wall, 1),
        "records": ex.report.records,
        "answer_writer": ex.answer_writer(),
        "paraphrase_writer": ex.paraphrase_writer(),
        "retry_kept": o["questions_from_retry"],
        "stage_seconds": ex.report.stats["run"]["stage_seconds"],
        "questions_kept": o["questions_kept"],
        "questions_generated": o["questions_generated"],
        "variations_generated": o["variations_generated"],
        "paraphrases_by_source": paraphrases,
        "records_digest": hashlib.sha256(json.dumps(contents).encode()).hexdigest()[:16],
        "answers": o["answers"],
        "dropped": o["dropped"],
    }


def part_shared_prefix(gen, chunks: list[dict], embedder, args) -> dict:
    """Part 4: one chunk's answer prompts prefilled once (share_prefix) vs today's prompts."""
    import re

    from memchat import qa
    from memchat.chunking import split_sentences

    today, whole = [], []
    for c in chunks:
        words = sorted({w for w in re.findall(r"[A-Za-z]{6,}", c["text"])}, key=lambda w: (-len(w), w))[: args.pairs]
        questions = [f"What does the text say about {w}?" for w in words]
        sentences = [s for s in split_sentences(c["text"]) if s.strip()]
        svec = embedder.encode(sentences)
        for q in questions:
            qv = embedder.encode([q])[0]
            best = sorted(sorted(range(len(sentences)), key=lambda i: -float(svec[i] @ qv))[:3])
            today.append(qa.answer_prompt(q, " ".join(sentences[i] for i in best)))
            whole.append(qa.answer_prompt(q, c["text"]))
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=0.0, repetition_penalty=1.1, batch_size=args.batch_size,
              stop=qa.ANSWER_STOP)
    out = {"chunks": len(chunks), "pairs": args.pairs, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size}
    texts = {}
    for name, prompts, share in (("today", today, False), ("chunk", whole, False), ("shared", whole, True)):
        gen.stats.reset()
        t = time.perf_counter()
        results = gen.generate(prompts, share_prefix=share, **kw)
        secs = time.perf_counter() - t
        texts[name] = [r.text for r in results]
        out[name] = {"prompts": len(prompts), "seconds": round(secs, 2), "s_per_chunk": round(secs / len(chunks), 2),
                     "prompt_tokens_mean": round(gen.stats.prompt_tokens / len(prompts)),
                     "shared_prefix_tokens": gen.stats.shared_prefix_tokens, "new_tokens": gen.stats.new_tokens}
        say(f"  {name}: {secs:.1f} s, {gen.stats.new_tokens} tokens, prefill saved {gen.stats.shared_prefix_tokens} tokens")
    out["identical"] = sum(a == b for a, b in zip(texts["chunk"], texts["shared"]))
    return out


def part_engine(kb, embedder, chunks: int, args, tmp: Path) -> dict:
    """Part 2's extraction with an ``LLMServerClient`` as the generator (``self``: a main.py serve started here)."""
    import socket
    import subprocess

    from _common import worker_env

    from memchat.config import ExtractConfig
    from memchat.extraction import FAISSDataExtractor
    from memchat.llm_client import LLMServerClient

    server = None
    url = args.llm_server
    if url == "self":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, str(REPO / "main.py"), "serve", "--no-auth", "--port", str(port), "--model", args.model,
               "--max-batch", str(args.batch_size)]
        threads = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)} if args.threads else {}
        server = subprocess.Popen(cmd, env=worker_env(MEMCHAT_HOME=str(tmp), **threads), stdout=subprocess.PIPE, text=True)
        say(f"  {server.stdout.readline().strip()}")
        url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                client = LLMServerClient(url, args.llm_model)
                break
            except Exception:
                if time.monotonic() > deadline or (server is not None and server.poll() is not None):
                    raise
                time.sleep(0.5)
        client.generate([[{"role": "user", "content": "warm-up"}]], max_new_tokens=4)
        cfg = ExtractConfig(max_pairs_per_chunk=args.pairs, batch_size=args.batch_size, max_chunks=chunks)
        ex = FAISSDataExtractor(kb, client, embedder=embedder, extract_config=cfg, output_dir=tmp / "td-engine",
                                progress=False)
        t = time.perf_counter()
        path = ex.create_training_dataset()
        wall = time.perf_counter() - t
        local = json.loads((tmp / "td" / Path(path).name).read_text(encoding="utf-8"))["records"]
        remote = json.loads(Path(path).read_text(encoding="utf-8"))["records"]
        o = ex.report.stats["overall"]
        say(f"  through the server: {wall:.1f} s, {client.stats.new_tokens} tokens")
        return {"engine": client.resolved.display_name, "concurrency": client.cfg.concurrency, "chunks": chunks,
                "wall_s": round(wall, 2), "s_per_chunk": round(wall / chunks, 2),
                "kept_per_chunk": round(o["questions_kept"] / chunks, 2), "records": ex.report.records,
                "generated_tokens": client.stats.new_tokens, "same_records": local == remote}
    finally:
        if server is not None:  # the server this bench started, by its own handle
            server.terminate()
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()


def load_generator(model: str, dtype: str):
    """A second Generator of ``model`` in ``dtype`` (memchat.device reads MEMCHAT_DTYPE), the variable restored."""
    from unittest import mock

    from memchat.generation import Generator

    with mock.patch.dict(os.environ, {"MEMCHAT_DTYPE": dtype}):
        return Generator(model)


def warm_up(gen, chunks) -> None:
    """One short batched call before any clock starts (kernels picked, caches allocated)."""
    from memchat import qa

    gen.generate([qa.question_prompt(chunks[0]["text"], 3)] * 2, max_new_tokens=8)


def dtype_name(gen) -> str:
    return str(gen.model.dtype).removeprefix("torch.")


def stages_text(r: dict) -> str:
    """An extraction's seconds by stage, e.g. "questions 10, retrying 4"."""
    return ", ".join(f"{k} {v:.0f}" for k, v in r["stage_seconds"].items())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_argument_group("model")
    g.add_argument("--model", default="bundled", help="generation model (default: the bundled SmolLM2-135M-Instruct)")
    g.add_argument("--pdfs", default=None, metavar="DIR",
                   help="the PDFs to put in the store (default: ../shared/data/qa_dev/pdfs)")
    g.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (default 16)")
    g.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: torch's choice). On a machine busy with other work, 1 avoids "
                        "OpenMP threads spinning against each other (measured 3-8x slower here with 2)")
    g = p.add_argument_group("part 1: batched vs loop")
    g.add_argument("--prompts", type=int, default=16, help="prompts per set (default 16)")
    g.add_argument("--max-new-tokens", type=int, default=48, help="tokens per prompt at most (default 48)")
    g.add_argument("--sets", default="short,answer", help="prompt sets to compare (default short,answer)")
    g.add_argument("--skip-loop", action="store_true", help="skip part 1")
    g = p.add_argument_group("part 2: extraction overhead")
    g.add_argument("--chunks", type=int, default=6, help="chunks extracted (default 6)")
    g.add_argument("--pairs", type=int, default=3, help="questions per chunk (default 3)")
    g.add_argument("--skip-extraction", action="store_true", help="skip part 2")
    g.add_argument("--no-writers", dest="writers", action="store_false",
                   help="do not run part 2 a second time with the model writing answers and paraphrases "
                        "(answer_writer and paraphrase_writer 'model': the path before; by default both run and are "
                        "compared)")
    g.add_argument("--baseline-dtype", default="float32",
                   help="dtype of the run with the model writing answers and paraphrases (default float32: the CPU "
                        "dtype before memchat.device chose bf16 on CPUs with bf16 instructions). When today's dtype "
                        "differs, today's path also runs in this dtype, so the table shows what each change buys")
    g.add_argument("--retry-spare", type=int, default=None, metavar="K",
                   help="run part 2 again with ExtractConfig.retry_spare_sentences=K (spare sentences the retry asks "
                        "about beyond the questions missing) and compare with today's default")
    g.add_argument("--share-prefix", action="store_true",
                   help="run part 2 a second time with generate(share_prefix=True) on every call (today's prompts)")
    g = p.add_argument_group("part 4: shared prefix")
    g.add_argument("--prefix-chunks", type=int, default=4, help="chunks in part 4 (default 4)")
    g.add_argument("--skip-prefix", action="store_true", help="skip part 4")
    g = p.add_argument_group("part 3: extraction on an external engine")
    g.add_argument("--llm-server", default=None, metavar="URL",
                   help="also extract through this OpenAI-compatible server (e.g. http://127.0.0.1:8000/v1 of vllm serve); "
                        "'self' starts main.py serve on this machine with --model")
    g.add_argument("--llm-model", default=None, help="model name on that server (default: the first it lists)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from memchat.device import _DTYPE_NAMES  # "fp32", "bf16", ... -> the torch name that dtype_name() gives
    from memchat.generation import Generator
    from memchat.knowledge import KnowledgeBase

    results: dict = {"machine": cpu_note(0), "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="memchat-bench-gen-") as tmp:
        os.environ["MEMCHAT_HOME"] = tmp
        for k in ("MEMCHAT_KEY", "MEMCHAT_PASSPHRASE", "MEMCHAT_STORAGE_DIR"):
            os.environ.pop(k, None)
        pdfs = sorted(Path(args.pdfs).glob("*.pdf")) if args.pdfs else QA_PDFS
        say(f"building a knowledge base from {len(pdfs)} PDFs of {pdfs[0].parent if pdfs else args.pdfs} ...")
        kb = KnowledgeBase()
        kb.add_documents(pdfs)
        chunks = kb.chunks()
        embedder = kb.embedder()
        say(f"  {len(chunks)} chunks; loading {args.model} ...")
        t = time.perf_counter()
        gen = Generator(args.model)
        results["model"] = gen.resolved.display_name
        results["device"] = str(gen.device)
        results["dtype"] = dtype_name(gen)
        results["load_s"] = round(time.perf_counter() - t, 1)
        warm_up(gen, chunks)
        if not args.skip_loop:
            results["batched_vs_loop"] = {}
            for name in [s.strip() for s in args.sets.split(",") if s.strip()]:
                prompts = prompt_set(name, chunks, embedder, args.prompts)
                say(f"part 1 [{name}]: {len(prompts)} prompts, batched (batch {args.batch_size}) vs one at a time ...")
                r = part_batched_vs_loop(gen, prompts, args.batch_size, args.max_new_tokens)
                r["prompt_tokens_mean"] = round(sum(len(gen.encode(gen.format_prompt(p))) for p in prompts) / len(prompts))
                results["batched_vs_loop"][name] = r
        if not args.skip_prefix:
            n = min(args.prefix_chunks, len(chunks))
            say(f"part 4: the answer stage of {n} chunks, {args.pairs} questions each, with and without a shared prefix ...")
            results["shared_prefix"] = part_shared_prefix(gen, chunks[:n], embedder, args)
        if not args.skip_extraction:
            n = min(args.chunks, len(chunks))
            say(f"part 2: extraction of {n} chunks ({args.pairs} questions each, paraphrases on) ...")
            results["extraction"] = part_extraction(kb, gen, embedder, n, args.pairs, args.batch_size, Path(tmp) / "td")
            results["extraction"]["dtype"] = results["dtype"]
            before = gen
            wanted = args.baseline_dtype.lower().removeprefix("torch.")
            if _DTYPE_NAMES.get(wanted, wanted) != results["dtype"]:
                say(f"  loading {args.model} again in {args.baseline_dtype} (MEMCHAT_DTYPE) ...")
                before = load_generator(args.model, args.baseline_dtype)
                warm_up(before, chunks)
                say(f"part 2 again in {args.baseline_dtype}, today's path ...")
                results["extraction_baseline_dtype"] = part_extraction(kb, before, embedder, n, args.pairs,
                                                                       args.batch_size, Path(tmp) / "td-dtype")
                results["extraction_baseline_dtype"]["dtype"] = dtype_name(before)
            if args.retry_spare is not None:
                say(f"part 2 again with retry_spare_sentences={args.retry_spare} ...")
                results["extraction_retry_spare"] = part_extraction(kb, gen, embedder, n, args.pairs, args.batch_size,
                                                                    Path(tmp) / "td-spare",
                                                                    retry_spare_sentences=args.retry_spare)
            if args.writers and (results["extraction"]["answer_writer"], results["extraction"]["paraphrase_writer"]) \
                    != ("model", "model"):
                say(f"part 2 again with the model writing answers and paraphrases (the path before the writers), "
                    f"{dtype_name(before)} ...")
                results["extraction_model_answers"] = part_extraction(kb, before, embedder, n, args.pairs, args.batch_size,
                                                                      Path(tmp) / "td-model", answer_writer="model",
                                                                      paraphrase_writer="model", retry_spare_sentences=0)
                results["extraction_model_answers"]["dtype"] = dtype_name(before)
            if args.share_prefix:
                say(f"part 2 again, share_prefix=True on every generate call ...")
                results["extraction_shared"] = part_extraction(kb, gen, embedder, n, args.pairs, args.batch_size,
                                                               Path(tmp) / "td-shared", {"share_prefix": True})
            if args.llm_server:
                say(f"part 3: the same extraction through {args.llm_server} ...")
                results["engine"] = part_engine(kb, embedder, n, args, Path(tmp))
    results["load_after"] = cpu_note(0)

    print(f"\nmodel {results['model']} on {results['device']} ({results['dtype']}), torch threads {results['torch_threads']}; "
          f"{results['machine']} -> {results['load_after']}")
    for name, r in results.get("batched_vs_loop", {}).items():
        print(table(
            ["path", "prompts", "tokens", "seconds", "tokens/s"],
            [[f"batched (batch {r['batch_size']})", r["prompts"], r["batched_tokens"], r["batched_s"], r["batched_tok_s"]],
             ["one at a time", r["prompts"], r["loop_tokens"], r["loop_s"], r["loop_tok_s"]]],
            title=f"\n1. [{name}] batched vs loop, greedy, max_new_tokens {r['max_new_tokens']}, "
                  f"~{r['prompt_tokens_mean']} prompt tokens each",
        ))
        print(f"speed-up: {r['speedup_tok_s']}x tokens/s ({r['speedup_wall']}x wall); "
              f"identical outputs {r['identical_outputs']}/{r['prompts']}  (target >= 6x at batch 16)")
    if "extraction" in results:
        r = results["extraction"]
        print(table(
            ["", "seconds", "tokens", "generate calls", "prompts"],
            [["extraction (wall)", r["extraction_wall_s"], r["generated_tokens"], r["generate_calls"], r["prompts"]],
             ["  of which inside generate", r["inside_generate_s"], "", "", ""],
             ["bare generate, same calls", r["bare_replay_s"], r["replay_tokens"], r["generate_calls"], r["prompts"]]],
            title=f"\n2. extraction of {r['chunks']} chunks, {r['pairs_per_chunk']} questions each",
        ))
        print(f"extraction / bare generation: {r['wall_over_bare']}x  (target <= 1.3x); extraction / its own time "
              f"inside generate: {r['wall_over_inside']}x (the same ratio, immune to load changing between the runs)")
        print(f"seconds per chunk: {r['extraction_wall_s'] / r['chunks']:.2f}; questions kept per chunk: "
              f"{r['questions_kept'] / r['chunks']:.2f}")
        print(f"kept {r['questions_kept']} of {r['questions_generated']} questions, {r['records']} records, "
              f"answers {r['answers']}, dropped {r['dropped']}")
    if "extraction_model_answers" in results:
        a, b = results["extraction_model_answers"], results["extraction"]
        rows = []
        today = f"answers: {b['answer_writer']}, paraphrases: {b['paraphrase_writer']}"
        runs = [(f"model writes answers + paraphrases (before), {a['dtype']}", a)]
        if "extraction_baseline_dtype" in results:
            runs.append((f"{today}, {results['extraction_baseline_dtype']['dtype']}", results["extraction_baseline_dtype"]))
        runs.append((f"{today}, {b['dtype']} (default)", b))
        for name, r in runs:
            stages = stages_text(r)
            rows.append([name, round(r["extraction_wall_s"] / r["chunks"], 2), round(r["questions_kept"] / r["chunks"], 2),
                         r["records"], r["generated_tokens"], stages,
                         f"{(a['extraction_wall_s'] / a['chunks']) / (r['extraction_wall_s'] / r['chunks']):.2f}x"])
        print(table(["extraction", "s/chunk", "questions kept/chunk", "records", "generated tokens", "seconds by stage",
                     "speed-up"], rows,
                    title=f"\n2c. who writes answers and paraphrases, {b['chunks']} chunks x {b['pairs_per_chunk']} questions "
                          "(target: <= 1/3 of the s/chunk, at least as many questions kept)"))
        print(f"answers before: {a['answers']}; now: {b['answers']}; questions from the retry: {a['retry_kept']} / "
              f"{b['retry_kept']}")
        print(f"paraphrases before: {a['paraphrases_by_source']} of {a['variations_generated']} generated; "
              f"now: {b['paraphrases_by_source']} of {b['variations_generated']} generated")
        print(f"same records (kind, question, answer) in both: {a['records_digest'] == b['records_digest']} (expect False "
              f"when the dtypes differ, {a['dtype']} / {b['dtype']}, or the retry's spare sentence asks more)")
    if "extraction_baseline_dtype" in results and "extraction_model_answers" not in results:
        base = results["extraction_baseline_dtype"]
        rows = [[f"today's path, {r['dtype']}", round(r["extraction_wall_s"] / r["chunks"], 2),
                 round(r["questions_kept"] / r["chunks"], 2), r["records"], stages_text(r)]
                for r in (base, results["extraction"])]
        print(table(["extraction", "s/chunk", "questions kept/chunk", "records", "seconds by stage"], rows,
                    title=f"\n2d. the same extraction in {base['dtype']} and in today's dtype"))
    if "extraction_retry_spare" in results:
        from memchat.config import ExtractConfig

        default = ExtractConfig().retry_spare_sentences
        rows = [[f"retry_spare_sentences={k}{' (default)' if k == default else ''}",
                 round(r["extraction_wall_s"] / r["chunks"], 2), round(r["questions_kept"] / r["chunks"], 2),
                 r["questions_kept"], r["retry_kept"], stages_text(r)]
                for k, r in ((default, results["extraction"]), (args.retry_spare, results["extraction_retry_spare"]))]
        print(table(["extraction", "s/chunk", "questions kept/chunk", "kept", "from the retry", "seconds by stage"], rows,
                    title="\n2e. spare sentences for the retry"))
    if "extraction_shared" in results:
        a, b = results["extraction"], results["extraction_shared"]
        print(table(["extraction", "s/chunk", "questions kept/chunk", "records"],
                    [["today", round(a["extraction_wall_s"] / a["chunks"], 2), round(a["questions_kept"] / a["chunks"], 2), a["records"]],
                     ["share_prefix on every call", round(b["extraction_wall_s"] / b["chunks"], 2),
                      round(b["questions_kept"] / b["chunks"], 2), b["records"]]],
                    title="\n2b. the same extraction with share_prefix=True (today's prompts, nothing else changed)"))
    if "shared_prefix" in results:
        r = results["shared_prefix"]
        rows = [[name, v["prompts"], v["prompt_tokens_mean"], v["shared_prefix_tokens"], v["seconds"], v["s_per_chunk"],
                 f"{r['today']['seconds'] / v['seconds']:.2f}x"] for name, v in
                (("today: own best sentences per question", r["today"]), ("whole chunk per question", r["chunk"]),
                 ("whole chunk, share_prefix=True", r["shared"]))]
        print(table(["prompts", "n", "prompt tok", "prefill saved", "seconds", "s/chunk", "vs today"], rows,
                    title=f"\n4. answer stage of {r['chunks']} chunks x {r['pairs']} questions, greedy, "
                          f"max_new_tokens {r['max_new_tokens']}, batch {r['batch_size']}"))
        print(f"identical outputs, whole chunk with vs without share_prefix: {r['identical']}/{r['shared']['prompts']}")
    if "engine" in results:
        r, local = results["engine"], results["extraction"]
        rows = [["in-process generate (part 2)", local["chunks"], local["extraction_wall_s"],
                 round(local["extraction_wall_s"] / local["chunks"], 2), round(local["questions_kept"] / local["chunks"], 2),
                 local["records"], "1.00x"],
                [f"server: {r['engine']}", r["chunks"], r["wall_s"], r["s_per_chunk"], r["kept_per_chunk"], r["records"],
                 f"{(local['extraction_wall_s'] / local['chunks']) / r['s_per_chunk']:.2f}x"]]
        print(table(["path", "chunks", "seconds", "s/chunk", "kept/chunk", "records", "speed-up"], rows,
                    title=f"\n3. extraction on an external engine ({r['concurrency']} requests in flight)"))
        print(f"same records as in-process: {r['same_records']}  (target on a GPU: vLLM >= 10x in-process generate)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
