"""Mem_Chat RAG: chat with your PDFs, privately.

    python main.py                      # start the Streamlit app on 127.0.0.1 (same as: streamlit run main.py)
    python main.py app --host 0.0.0.0   # the same, reachable from other machines: needs MEMCHAT_APP_PASSWORD
    python main.py add FILE.pdf ...     # add or update PDFs in encrypted_faiss_storage/
    python main.py list                 # documents, versions, pages, chunks
    python main.py remove NAME          # remove a document and its chunks
    python main.py rekey                # re-encrypt under a new key/passphrase (MEMCHAT_NEW_PASSPHRASE, or asks)
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
    add.add_argument("files", nargs="+", help="PDF files, or folders: a folder adds the PDFs directly inside it")
    add.add_argument("--password", action="append", default=[], metavar="NAME",
                     help="prompt for the password of the encrypted PDF NAME (repeatable). Without a prompt: "
                          "MEMCHAT_PDF_PASSWORD is tried on every encrypted PDF. NAME=PASSWORD still works but puts "
                          "the password in argv (ps, /proc, shell history)")
    g = add.add_argument_group("chunking and embedding")
    g.add_argument("--chunk-size", type=int, default=ChunkConfig.chunk_size, help="characters per chunk")
    g.add_argument("--chunk-overlap", type=int, default=ChunkConfig.chunk_overlap, help="characters of overlap")
    g.add_argument("--embedding-model", default=EmbeddingConfig.model_name, help="sentence-transformers model")
    g.add_argument("--embedding-backend", default=EmbeddingConfig.backend, choices=["onnx-int8", "onnx", "torch"],
                   help="embedding runtime for a new store (an existing store keeps its own)")
    g = add.add_argument_group("scanned pages and limits")
    g.add_argument("--no-ocr", action="store_true",
                   help="don't OCR pages without a text layer (OCR is on by default; MEMCHAT_OCR=0 turns it off too). "
                        "Caps per file: MEMCHAT_MAX_FILE_BYTES, MEMCHAT_MAX_PAGES, MEMCHAT_MAX_CHARS, MEMCHAT_MAX_CHUNKS, "
                        "MEMCHAT_MAX_OCR_PAGES")

    sub.add_parser("list", help="list documents (loads no model)")

    sub.add_parser("rekey", help="re-encrypt the store under a new key or passphrase (loads no model)",
                   description="The current secret comes as for every command (key.key, MEMCHAT_KEY or "
                               "MEMCHAT_PASSPHRASE); the new one from MEMCHAT_NEW_PASSPHRASE or MEMCHAT_NEW_KEY, "
                               "else a prompt; with neither and no terminal, a fresh random key in key.key. "
                               "One atomic commit: a kill leaves the old state or the new, and the old key stops "
                               "opening the store.")

    rm = sub.add_parser("remove", help="remove a document (loads no model)")
    rm.add_argument("name", help="document name as shown by `list`")

    ask = sub.add_parser("ask", help="answer a question from the knowledge base")
    ask.add_argument("question", help="the question")
    g = ask.add_argument_group("retrieval")
    g.add_argument("--top-k", type=int, default=RAGConfig.top_k, help="chunks retrieved")
    g.add_argument("--embedding-model", default=EmbeddingConfig.model_name, help="must match the store's")
    g = ask.add_argument_group("answering")
    g.add_argument("--mode", choices=["auto", "extractive", "generative"], default=None,
                   help="extractive: a span copied from the documents; generative: the model writes it, then it is "
                        "checked against them; auto (default, or $MEMCHAT_ANSWER_MODE): extractive for small models")
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

    from memchat.names import escape_controls

    args.files, empty = expand_folders(args.files)
    for folder in empty:
        print(f"{escape_controls(folder)}: a folder with no PDF files directly inside it", file=sys.stderr)
    if not args.files:
        return 1
    passwords = pdf_passwords(args.files, args.password)
    kb = _kb(args)
    if args.no_ocr:
        kb.ingest_cfg.ocr = False
    bar = tqdm(total=len(args.files), unit="file", desc="ingesting", file=sys.stderr)

    def progress(name: str, frac: float, stage: str) -> None:
        bar.set_postfix_str(f"{name}: {stage}")
        if stage in ("saving", "failed", "unchanged"):  # this file's slow part is over
            bar.update(1)

    results = kb.add_documents(args.files, passwords=passwords, progress=progress)
    bar.close()
    retry = _ask_missing_passwords(args.files, results, passwords)  # at a terminal only
    if retry:
        again = {r.name: r for r in kb.add_documents(retry, passwords=passwords)}
        results = [again.get(r.name, r) for r in results]
    for r in results:
        print(escape_controls(r.message), file=sys.stderr if r.status == "error" else sys.stdout)
    return 1 if empty or any(r.status == "error" for r in results) else 0


def expand_folders(paths: list[str]) -> tuple[list[str], list[str]]:
    """(files, folders with no PDF): each folder replaced by the ``*.pdf`` files directly inside it, by name.

    Sub-folders are not searched: a document is known by its file name, so two ``report.pdf`` from two
    sub-folders would become versions of one document.
    """
    from pathlib import Path

    files: list[str] = []
    empty: list[str] = []
    for p in paths:
        if not Path(p).is_dir():
            files.append(p)
            continue
        pdfs = sorted(str(f) for f in Path(p).iterdir() if f.suffix.lower() == ".pdf" and f.is_file())
        files.extend(pdfs)
        if not pdfs:
            empty.append(p)
    return files, empty


def pdf_passwords(files: list[str], flags: list[str]) -> dict[str, str]:
    """PDF passwords by file name: prompted for ``--password NAME``, else MEMCHAT_PDF_PASSWORD for every file."""
    import getpass
    from pathlib import Path

    default = os.environ.get("MEMCHAT_PDF_PASSWORD")
    passwords = {Path(f).name: default for f in files} if default else {}
    in_argv = [f for f in flags if "=" in f]
    if in_argv:
        print("Warning: --password NAME=PASSWORD leaves the password in ps, /proc/*/cmdline and your shell history; "
              "use --password NAME (prompts) or MEMCHAT_PDF_PASSWORD instead.", file=sys.stderr)
    for flag in flags:
        name, sep, password = flag.partition("=")
        passwords[Path(name).name] = password if sep else getpass.getpass(f"Password for {name}: ")
    return passwords


def _ask_missing_passwords(files: list[str], results, passwords: dict[str, str]) -> list[str]:
    """At a terminal, prompt once for each PDF that failed for want of a password; the files to retry."""
    import getpass
    from pathlib import Path

    if not sys.stdin.isatty():
        return []
    locked = {r.name for r in results if r.status == "error" and "password-protected;" in (r.error or "")}
    retry = []
    for f in files:
        name = Path(f).name
        if name in locked and name not in passwords:
            passwords[name] = getpass.getpass(f"{name} is password-protected. Password (empty to skip): ")
            if passwords[name]:
                retry.append(f)
    return retry


def cmd_list(args) -> int:
    from datetime import datetime

    from memchat.knowledge import KnowledgeBase

    from memchat.names import escape_controls

    kb = KnowledgeBase()
    docs = kb.documents()
    warning = kb.store.key_beside_data_warning()
    if warning:
        print(f"Warning: {warning}", file=sys.stderr)
    if not docs:
        print("No documents yet. Add some: python main.py add FILE.pdf")
        return 0
    names = [escape_controls(d["name"]) for d in docs]  # a newline or ANSI escape in an old name prints as \n, \x1b
    width = max(len(n) for n in names)
    print(f"{'document':<{width}}  version  pages  chunks  added")
    for name, d in zip(names, docs):
        added = datetime.fromtimestamp(d["added"]).strftime("%Y-%m-%d %H:%M")
        print(f"{name:<{width}}  {d['version']:>7}  {d['pages']:>5}  {d['chunks']:>6}  {added}")
    return 0


def cmd_remove(args) -> int:
    from memchat.knowledge import KnowledgeBase

    from memchat.names import escape_controls

    kb = KnowledgeBase()
    name = args.name
    shown = {escape_controls(d["name"]): d["name"] for d in kb.documents()}
    if name not in shown.values() and name in shown:  # the escaped form, as `list` shows it
        name = shown[name]
    rec = kb.remove(name)
    print(f"Removed {escape_controls(rec['name'])} (version {rec['version']}, {rec['chunks']} chunks).")
    return 0


def cmd_rekey(args) -> int:
    import getpass

    from memchat.crypto import PASSPHRASE_ENV, KEY_ENV, key_source, new_secret, new_secret_from_env
    from memchat.errors import MemChatError
    from memchat.store import EncryptedStore

    store = EncryptedStore()
    store.read()  # the current key must open it (NoStoreError, WrongKeyError) before anything is asked
    old_source = key_source()
    secret = new_secret_from_env()
    if secret is None and sys.stdin.isatty():
        passphrase = getpass.getpass("New passphrase (empty: a fresh random key in key.key): ")
        if passphrase and getpass.getpass("Again: ") != passphrase:
            raise MemChatError("The two passphrases differ; nothing was changed.")
        secret = new_secret(passphrase=passphrase) if passphrase else new_secret()
    elif secret is None:
        secret = new_secret()
    state = store.rekey(secret)
    docs = len(state.versions.get("documents", {}))
    print(f"Re-encrypted {store.dir}/ ({docs} documents) under {secret.description}; the old key no longer opens it.")
    if secret.cipher.source == "passphrase":
        print(f"From now on set {PASSPHRASE_ENV} to the new passphrase (key.key, if any, was deleted).")
    elif secret.cipher.source == "env-key":
        print(f"From now on set {KEY_ENV} to the new key (key.key, if any, was deleted).")
    if old_source in ("passphrase", "env-key") and secret.cipher.source == "key-file":
        print(f"Unset {PASSPHRASE_ENV if old_source == 'passphrase' else KEY_ENV}: the key is now {store.dir}/key.key.")
    from memchat.config import training_dir

    old_tokens = [p.name for p in sorted(training_dir().glob("*")) if p.is_file() and p.read_bytes()[:5] == b"gAAAA"]
    if old_tokens:  # Fernet tokens: extract_faiss_data.py --encrypt wrote them with the old key
        print(f"Warning: {training_dir()}/ was encrypted with the old key ({', '.join(old_tokens[:3])}"
              f"{', ...' if len(old_tokens) > 3 else ''}); make it again: python extract_faiss_data.py --encrypt "
              "--restart", file=sys.stderr)
    return 0


def cmd_ask(args) -> int:
    from memchat.config import GenerationConfig, RAGConfig
    from memchat.errors import MemChatError
    from memchat.llm_client import make_engine, server_url
    from memchat.rag import ANSWERED, RAGPipeline

    if not args.question.strip():
        raise MemChatError('The question is empty: ask something, e.g. main.py ask "What does section 3 require?"')
    kb = _kb(args)
    kb.store.read()  # fail fast (no store, wrong key) before loading any model
    cfg = RAGConfig(top_k=args.top_k)
    if args.mode:
        cfg.mode = args.mode
    # The model loads once, before the answer: it writes generative answers and scores the extractive reader's spans.
    engine = make_engine(args.model, args.llm_server, llm_model=args.llm_model) if server_url(args.llm_server) else None
    rag = RAGPipeline(kb, engine, rag=cfg,
                      generation=GenerationConfig(model_name=args.model, max_new_tokens=args.max_new_tokens))
    mode = rag.resolved_mode()
    if mode == "generative" or rag.reader_cfg.lm_rerank:
        rag.generator  # load now: its fallback notice (if any) is logged before the answer starts
    pieces, answer = rag.stream(args.question)
    for piece in pieces:
        if mode == "extractive":
            print(piece, end="", flush=True)
    if mode == "generative":
        print(answer.text, end="")
    print()
    if answer.note:
        print(f"({answer.note})", file=sys.stderr)
    if answer.status != ANSWERED and answer.generated:
        print(f"(The model's answer was not supported by the documents: {answer.generated!r})", file=sys.stderr)
    if answer.evidence_line:
        print("\n" + answer.evidence_line)
    if answer.hits:
        print("\nSources:")
        for h in answer.hits:
            print(f"  - {h.citation}  (similarity {h.score:.2f})")
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
    handler = {"add": cmd_add, "list": cmd_list, "remove": cmd_remove, "ask": cmd_ask, "serve": cmd_serve, "rekey": cmd_rekey}[args.command]
    return run(handler, args)


from memchat.ui import running_under_streamlit  # noqa: E402

if running_under_streamlit():
    from memchat.ui.rag_app import render

    render()
elif __name__ == "__main__":
    raise SystemExit(main())
