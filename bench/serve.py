"""`main.py serve` under load: memchat-rag through the HTTP API vs RAGPipeline in-process.

    .venv/bin/python bench/serve.py                          # ~4-6 min on 2 idle cores
    .venv/bin/python bench/serve.py --requests 8 --max-new-tokens 16   # quicker
    .venv/bin/python bench/serve.py --json bench/out/serve.json

One knowledge base (the qa_dev PDFs, default embedder) in a temp folder; its
questions (qa_dev/qa.jsonl) asked --requests times at each level of --clients
concurrent clients, greedy, --max-new-tokens per answer, by two pipelines:

  in-process   one ``RAGPipeline`` (bundled SmolLM2-135M by default) in this process,
               called from N threads at once, as an app embedding Mem_Chat would call
               it: no batching, the threads share the model;
  api          ``python main.py serve --no-auth`` in its own process on a free
               loopback port, and N client threads sending POST /v1/chat/completions
               (model memchat-rag, non-streamed) with the standard library's HTTP.
               The server batches requests that arrive together (ServeConfig.max_batch).

--mode sets MEMCHAT_ANSWER_MODE for both: "generative" (default here: the instruct model
writes every answer, which is what the server's batching is for) or "extractive" (answers
copied from the evidence, no language model: retrieval-bound, nothing to batch).

Both load and warm up before any clock starts, and the levels alternate (in-process,
then api, at each level), so a change in the machine's load hits both alike. Per row: requests/s, p50/p95 latency,
and the ratio to the same level in-process. Targets (issue 11): API overhead over
in-process at 1 client <= 10%; API throughput at 4 clients >= 1.5x its 1-client rate.

Not a test: numbers depend on the machine and its load (shown); compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SHARED_DATA, cpu_note, say, table, worker_env  # noqa: E402

sys.path.insert(0, str(REPO))

QA_PDFS = sorted((SHARED_DATA / "qa_dev" / "pdfs").glob("*.pdf"))
QUESTIONS = SHARED_DATA / "qa_dev" / "qa.jsonl"


def questions(n: int) -> list[str]:
    qs = [json.loads(line)["question"] for line in open(QUESTIONS, encoding="utf-8")]
    return (qs * (n // len(qs) + 1))[:n]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def run_level(call, qs: list[str], clients: int) -> dict:
    """``qs`` answered by ``clients`` threads pulling from one queue; latency of each call, total wall."""
    latencies: list[float] = []
    lock = threading.Lock()
    todo = list(qs)
    failures: list[BaseException] = []

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                q = todo.pop(0)
            t = time.perf_counter()
            try:
                call(q)
            except BaseException as exc:  # reported after the level
                failures.append(exc)
                return
            with lock:
                latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed: {failures[0]!r}")
    return {"clients": clients, "requests": len(latencies), "wall_s": round(wall, 2),
            "req_s": round(len(latencies) / wall, 3), "p50_s": round(percentile(latencies, 0.5), 3),
            "p95_s": round(percentile(latencies, 0.95), 3), "mean_s": round(statistics.mean(latencies), 3)}


# ---------------------------------------------------------------------------
# The two pipelines
# ---------------------------------------------------------------------------
def inprocess_pipeline(args):
    """(ask, model name, load seconds): a warmed-up RAGPipeline in this process."""
    from memchat.config import GenerationConfig
    from memchat.knowledge import KnowledgeBase
    from memchat.rag import RAGPipeline

    t = time.perf_counter()
    rag = RAGPipeline(KnowledgeBase(), generation=GenerationConfig(model_name=args.model,
                                                                   max_new_tokens=args.max_new_tokens))
    rag.answer("warm-up: what is this about?")  # loads the embedder and the model, warms both
    return (lambda q: rag.answer(q).text), rag.generator.resolved.display_name, time.perf_counter() - t


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, env: dict):
    """(process, ask, load seconds): ``main.py serve`` in its own process, answering."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    cmd = [sys.executable, str(REPO / "main.py"), "serve", "--no-auth", "--port", str(port), "--model", args.model,
           "--max-new-tokens", str(args.max_new_tokens), "--max-batch", str(args.max_batch)]
    t = time.perf_counter()
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy

    def ask(q: str) -> str:
        body = json.dumps({"model": "memchat-rag", "messages": [{"role": "user", "content": q}]}).encode()
        request = urllib.request.Request(url + "/chat/completions", data=body, headers={"Content-Type": "application/json"})
        with opener.open(request, timeout=900) as response:
            return json.loads(response.read())["choices"][0]["message"]["content"]

    try:
        banner = server.stdout.readline().strip()  # "serving ... on http://..." once the model is loaded
        if not banner.startswith("serving"):
            raise RuntimeError(f"main.py serve did not start (exit {server.poll()}): {banner}")
        say(f"  {banner}")
        deadline = time.monotonic() + 120
        while True:
            try:
                opener.open(url + "/models", timeout=5).read()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("main.py serve never answered GET /v1/models") from None
                time.sleep(0.2)
        ask("warm-up: what is this about?")
    except BaseException:
        stop_server(server)
        raise
    return server, ask, time.perf_counter() - t


def stop_server(server) -> None:
    server.terminate()  # the server this bench started, by its own handle
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="bundled", help="generation model (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--requests", type=int, default=16, help="questions asked at each level (default 16)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrency levels (default 1 4 16)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer length cap (default 32)")
    p.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch (default 8)")
    p.add_argument("--mode", default="generative", choices=["generative", "extractive", "auto"],
                   help="RAG answer mode for both pipelines (MEMCHAT_ANSWER_MODE; default generative)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads in both pipelines (default: torch's choice); 1 is steadier on a busy machine")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)

    results: dict = {"machine": cpu_note(0), "settings": vars(args)}
    extra = {"MEMCHAT_ANSWER_MODE": args.mode}
    if args.threads:
        extra.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    with tempfile.TemporaryDirectory(prefix="memchat-bench-serve-") as home:
        say(f"building a knowledge base from {len(QA_PDFS)} qa_dev PDFs ...")
        env = worker_env(MEMCHAT_HOME=home, **extra)
        subprocess.run([sys.executable, str(REPO / "main.py"), "add", *map(str, QA_PDFS)], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.environ.update({k: v for k, v in env.items() if k.startswith(("MEMCHAT_", "HF_", "TRANSFORMERS_", "OMP_",
                                                                          "MKL_", "TOKENIZERS_"))})
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        say("loading the in-process RAGPipeline ...")
        local, model, local_load = inprocess_pipeline(args)
        say("starting main.py serve ...")
        server, remote, remote_load = start_server(args, env)
        results["inprocess"] = {"levels": [], "load_s": round(local_load, 1), "model": model}
        results["api"] = {"levels": [], "load_s": round(remote_load, 1)}
        try:
            qs = questions(args.requests)
            for n in args.clients:
                say(f"  {n} clients: in-process ...")
                results["inprocess"]["levels"].append(run_level(local, qs, n))
                say(f"  {n} clients: api ...")
                results["api"]["levels"].append(run_level(remote, qs, n))
        finally:
            stop_server(server)
    results["load_after"] = cpu_note(0)

    rows = []
    base = {lv["clients"]: lv for lv in results["inprocess"]["levels"]}
    api1 = results["api"]["levels"][0]
    for name in ("inprocess", "api"):
        for lv in results[name]["levels"]:
            ref = base[lv["clients"]]
            rows.append([name, lv["clients"], lv["requests"], lv["wall_s"], lv["req_s"], lv["p50_s"], lv["p95_s"],
                         f"{lv['req_s'] / ref['req_s']:.2f}x", f"{lv['req_s'] / api1['req_s']:.2f}x" if name == "api" else ""])
    print(f"\nmodel {results['inprocess']['model']}, answer mode {args.mode}, max_new_tokens {args.max_new_tokens}, server max_batch "
          f"{args.max_batch}; {results['machine']} -> {results['load_after']}")
    print(table(["pipeline", "clients", "requests", "wall s", "req/s", "p50 s", "p95 s", "vs in-process", "vs api@1"],
                rows, title="\nmemchat-rag: requests/s and latency"))
    one = base[api1["clients"]]
    overhead = api1["p50_s"] / one["p50_s"] - 1
    results["api_overhead_p50_at_1"] = round(overhead, 4)
    print(f"API overhead at {api1['clients']} client: p50 {overhead * 100:+.1f}% vs in-process (target <= +10%)")
    by = {lv["clients"]: lv for lv in results["api"]["levels"]}
    if 4 in by and 1 in by:
        results["api_4_over_1"] = round(by[4]["req_s"] / by[1]["req_s"], 2)
        print(f"API throughput at 4 clients: {results['api_4_over_1']}x its 1-client rate (target >= 1.5x)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
