"""Mem_Chat RAG: chat with your PDFs, privately.

    python main.py                      # start the Streamlit app on 127.0.0.1 (same as: streamlit run main.py)
    python main.py app --host 0.0.0.0   # the same, reachable from other machines: needs MEMCHAT_APP_PASSWORD
    python main.py add FILE.pdf ...     # add or update PDFs in encrypted_faiss_storage/
    python main.py list                 # documents, versions, pages, chunks
    python main.py remove NAME          # remove a document and its chunks
    python main.py ask "QUESTION"       # answer with citations on stdout
    python main.py ask "Q" --llm-server http://127.0.0.1:8000/v1   # generate on vLLM / llama-server / Ollama
    python main.py serve                # OpenAI-compatible API on 127.0.0.1:8000 (needs MEMCHAT_API_KEY or --no-auth)

Every subcommand has --help. Errors: one line on stderr, exit code 1.
"""

from __future__ import annotations

import argparse
import os
import sys



def build_parser() -> argparse.ArgumentParser:
    from memchat.cli import add_app_flags
    from memchat.config import AppConfig, ChunkConfig, EmbeddingConfig, GenerationConfig, RAGConfig

    p = argparse.ArgumentParser(prog="main.py", description="Mem_Chat: RAG over your own PDFs, encrypted at rest.")
    sub = p.add_subparsers(dest="command")

    app = sub.add_parser("app", help="start the Streamlit app (the default with no subcommand)")
    add_app_flags(app, AppConfig.rag_port)

    add = sub.add_parser("add", help="add or update PDFs")
    add.add_argument("files", nargs="+", help="PDF files")
    add.add_argument("--password", action="append", default=[], metavar="NAME=PASSWORD",
                     help="password of an encrypted PDF (repeatable)")
    g = add.add_argument_group("chunking and embedding")
    g.add_argument("--chunk-size", type=int, default=ChunkConfig.chunk_size, help="characters per chunk")
    g.add_argument("--chunk-overlap", type=int, default=ChunkConfig.chunk_overlap, help="characters of overlap")
    g.add_argument("--embedding-model", default=EmbeddingConfig.model_name, help="sentence-transformers model")
    g.add_argument("--embedding-backend", default=EmbeddingConfig.backend, choices=["onnx-int8", "onnx", "torch"],
                   help="embedding runtime for a new store (an existing store keeps its own)")

    sub.add_parser("list", help="list documents (loads no model)")

    rm = sub.add_parser("remove", help="remove a document (loads no model)")
    rm.add_argument("name", help="document name as shown by `list`")

    ask = sub.add_parser("ask", help="answer a question from the knowledge base")
    ask.add_argument("question", help="the question")
    g = ask.add_argument_group("retrieval")
    g.add_argument("--top-k", type=int, default=RAGConfig.top_k, help="chunks retrieved")
    g.add_argument("--embedding-model", default=EmbeddingConfig.model_name, help="must match the store's")
    g = ask.add_argument_group("generation")
    g.add_argument("--model", default=GenerationConfig.model_name, help="instruct model (hub id or local folder)")
    g.add_argument("--max-new-tokens", type=int, default=GenerationConfig.max_new_tokens, help="answer length cap")
    _add_llm_server_flags(ask)

    from memchat.config import ServeConfig

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP API (models, chat completions, documents)")
    g = serve.add_argument_group("listening")
    g.add_argument("--host", default=ServeConfig.host, help=f"address to bind (default {ServeConfig.host}: this machine only)")
    g.add_argument("--port", type=int, default=ServeConfig.port, help=f"port (default {ServeConfig.port})")
    g.add_argument("--no-auth", action="store_true",
                   help="serve without a key (loopback only); otherwise clients send Bearer $MEMCHAT_API_KEY")
    g = serve.add_argument_group("models")
    g.add_argument("--model", default=GenerationConfig.model_name, help="instruct model for memchat-rag/-hybrid")
    g.add_argument("--served-model-name", default=None,
                   help="name the base model is listed under (default: its hub id, or the folder given)")
    g.add_argument("--top-k", type=int, default=RAGConfig.top_k, help="chunks retrieved")
    g.add_argument("--max-new-tokens", type=int, default=GenerationConfig.max_new_tokens,
                   help="default answer length cap (a request's max_tokens overrides it for the base model)")
    g.add_argument("--max-batch", type=int, default=ServeConfig.max_batch,
                   help="concurrent requests batched into one generate call (1 = one at a time)")
    _add_llm_server_flags(serve)
    return p


def _add_llm_server_flags(parser) -> None:
    g = parser.add_argument_group("external generation engine")
    g.add_argument("--llm-server", default=None, metavar="URL",
                   help="OpenAI-compatible server that generates instead of this process, e.g. http://127.0.0.1:8000/v1 "
                        "(vllm serve, llama-server, Ollama; default $MEMCHAT_LLM_SERVER; key in $MEMCHAT_LLM_API_KEY)")
    g.add_argument("--llm-model", default=None, help="model name on that server (default: the first it lists)")


def _kb(args):
    from memchat.config import ChunkConfig, EmbeddingConfig
    from memchat.knowledge import KnowledgeBase

    emb = EmbeddingConfig(model_name=getattr(args, "embedding_model", EmbeddingConfig.model_name))
    if getattr(args, "embedding_backend", None):
        emb.backend = args.embedding_backend
    chunk = ChunkConfig()
    if getattr(args, "chunk_size", None):
        chunk = ChunkConfig(chunk_size=args.chunk_size, chunk_overlap=args.chunk_overlap)
    return KnowledgeBase(chunking=chunk, embedding=emb)


def cmd_add(args) -> int:
    from tqdm import tqdm

    passwords = dict(p.split("=", 1) for p in args.password if "=" in p)
    kb = _kb(args)
    bar = tqdm(total=len(args.files), unit="file", desc="ingesting", file=sys.stderr)

    def progress(name: str, frac: float, stage: str) -> None:
        bar.set_postfix_str(f"{name}: {stage}")
        if stage in ("saving", "failed", "unchanged"):  # this file's slow part is over
            bar.update(1)

    results = kb.add_documents(args.files, passwords=passwords, progress=progress)
    bar.close()
    for r in results:
        print(r.message, file=sys.stderr if r.status == "error" else sys.stdout)
    return 1 if any(r.status == "error" for r in results) else 0


def cmd_list(args) -> int:
    from datetime import datetime

    from memchat.knowledge import KnowledgeBase

    docs = KnowledgeBase().documents()
    if not docs:
        print("No documents yet. Add some: python main.py add FILE.pdf")
        return 0
    width = max(len(d["name"]) for d in docs)
    print(f"{'document':<{width}}  version  pages  chunks  added")
    for d in docs:
        added = datetime.fromtimestamp(d["added"]).strftime("%Y-%m-%d %H:%M")
        print(f"{d['name']:<{width}}  {d['version']:>7}  {d['pages']:>5}  {d['chunks']:>6}  {added}")
    return 0


def cmd_remove(args) -> int:
    from memchat.knowledge import KnowledgeBase

    rec = KnowledgeBase().remove(args.name)
    print(f"Removed {rec['name']} (version {rec['version']}, {rec['chunks']} chunks).")
    return 0


def cmd_ask(args) -> int:
    from memchat.config import GenerationConfig, RAGConfig
    from memchat.rag import RAGPipeline

    kb = _kb(args)
    kb.store.read()  # fail fast (no store, wrong key) before loading any model
    from memchat.llm_client import make_engine

    rag = RAGPipeline(kb, make_engine(args.model, args.llm_server, llm_model=args.llm_model), rag=RAGConfig(top_k=args.top_k),
                      generation=GenerationConfig(model_name=args.model, max_new_tokens=args.max_new_tokens))
    rag.generator  # load now: its fallback notice (if any) is logged before the answer starts
    pieces, answer = rag.stream(args.question)
    for piece in pieces:
        print(piece, end="", flush=True)
    print()
    if answer.evidence_line:
        print("\n" + answer.evidence_line)
    if answer.hits:
        print("\nSources:")
        for h in answer.hits:
            print(f"  - {h.citation}  (score {h.score:.2f})")
    return 0


def cmd_serve(args) -> int:
    from memchat.serve import serve

    return serve(host=args.host, port=args.port, no_auth=args.no_auth, model_name=args.model,
                 served_model_name=args.served_model_name, top_k=args.top_k, max_new_tokens=args.max_new_tokens,
                 max_batch=args.max_batch, llm_server=args.llm_server, llm_model=args.llm_model)


def launch_app(host: str, port: int) -> int:
    from memchat.cli import launch_streamlit

    return launch_streamlit(__file__, host, port)  # bound to 127.0.0.1 unless --host (and a password)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import logging

    # Library notices (e.g. "model X not available offline; using the bundled one") as one plain line.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    from memchat.cli import run
    from memchat.config import AppConfig

    if args.command in (None, "app"):
        return run(launch_app, getattr(args, "host", AppConfig.host), getattr(args, "port", AppConfig.rag_port))
    handler = {"add": cmd_add, "list": cmd_list, "remove": cmd_remove, "ask": cmd_ask, "serve": cmd_serve}[args.command]
    return run(handler, args)


from memchat.ui import running_under_streamlit  # noqa: E402

if running_under_streamlit():
    from memchat.ui.rag_app import render

    render()
elif __name__ == "__main__":
    raise SystemExit(main())
