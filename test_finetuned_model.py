"""Chat with the fine-tuned model in finetuned_model/, and measure it against RAG.

    python test_finetuned_model.py                          # chat in the terminal (answers stream)
    python test_finetuned_model.py --question "QUESTION"    # answer once and exit
    python test_finetuned_model.py --model-dir DIR          # another fine-tuned folder
    python test_finetuned_model.py streamlit                # the Streamlit chat
    streamlit run test_finetuned_model.py streamlit         # the same
    python test_finetuned_model.py --eval QUESTIONS.jsonl   # base vs fine-tuned vs RAG vs hybrid:
                                                            #   table, eval_results/*.json and *.png

A question file is JSON Lines, {"question": ..., "answers": [...], "doc": "file.pdf"?,
"options": [...]?} per line, or training_data/faiss_training_data.json (its
validation split). Errors: one line on stderr, exit code 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time



def build_parser() -> argparse.ArgumentParser:
    from memchat.config import AppConfig, GenerationConfig, finetuned_dir
    from memchat.evaluate import SYSTEMS, EvalConfig
    from memchat.hybrid import STRATEGIES

    p = argparse.ArgumentParser(prog="test_finetuned_model.py",
                                description="Chat with the fine-tuned model, or compare it with RAG on a question set.")
    p.add_argument("mode", nargs="?", choices=["chat", "streamlit"], default="chat",
                   help="chat in the terminal (default), or start the Streamlit chat")

    g = p.add_argument_group("model")
    g.add_argument("--model-dir", default=str(finetuned_dir()), help="fine-tuned model folder (default finetuned_model/)")
    g.add_argument("--question", help="answer this one question and exit")
    g.add_argument("--max-length", type=int, default=512, help="prompt + answer tokens (the guide's max_length)")
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (the guide's 0.7)")
    g.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling (reproducible)")
    g.add_argument("--port", type=int, default=AppConfig.finetuned_port, help="port of the Streamlit chat")
    g.add_argument("--host", default=AppConfig.host,
                   help="address of the Streamlit chat (default 127.0.0.1, this machine only); anything else "
                        "needs MEMCHAT_APP_PASSWORD or MEMCHAT_APP_PASSWORD_HASH")

    e = p.add_argument_group("comparison (--eval)")
    e.add_argument("--eval", metavar="QUESTIONS", help="question file (JSONL, or the extraction's dataset JSON)")
    e.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, from {','.join(SYSTEMS)}")
    e.add_argument("--rag-model", default=os.environ.get("MEMCHAT_LLM", GenerationConfig.model_name),
                   help="instruct model for RAG and hybrid answers (default $MEMCHAT_LLM or the RAG app's)")
    e.add_argument("--base-model", help="model for the 'base' system (default: the fine-tuned model's base)")
    e.add_argument("--hybrid-strategy", default=EvalConfig.hybrid_strategy, choices=STRATEGIES, help="see memchat/hybrid.py")
    e.add_argument("--top-k", type=int, default=EvalConfig.top_k, help="chunks retrieved; also the k of hit@k")
    e.add_argument("--max-new-tokens", type=int, default=EvalConfig.max_new_tokens, help="answer length cap, every system")
    e.add_argument("--batch-size", type=int, default=EvalConfig.batch_size,
                   help="questions per generate call; 1 times each answer alone (true latency)")
    e.add_argument("--rag-mode", choices=["auto", "extractive", "generative"], default=None,
                   help="RAG answer mode (default $MEMCHAT_ANSWER_MODE or auto; see memchat/rag.py)")
    e.add_argument("--unanswerable", action="store_true",
                   help="the questions' answers are NOT in the store: measure abstention (ask a store without their PDFs)")
    e.add_argument("--limit", type=int, default=0, help="only the first N questions (0 = all)")
    e.add_argument("--out", help="output path, writes PATH.json and PATH.png (a .json or .png ending is dropped first; default eval_results/<questions>-<time>)")
    return p




def _quiet_transformers() -> None:
    """No per-load progress bars or advice lines from transformers: our own lines say what happens."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def cmd_chat(args) -> int:
    from memchat.finetuned import FineTunedChat

    _quiet_transformers()

    t0 = time.perf_counter()
    chat = FineTunedChat(args.model_dir)
    print(f"Loaded {chat.display_name} from {args.model_dir} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    stale = chat.staleness()
    if stale:
        print(f"Warning: {stale}", file=sys.stderr)
    settings = dict(max_length=args.max_length, temperature=args.temperature, do_sample=not args.greedy)

    def reply(question: str) -> None:
        t = time.perf_counter()
        for piece in chat.stream(question, **settings):
            print(piece, end="", flush=True)
        print()
        print(f"({time.perf_counter() - t:.1f} s)", file=sys.stderr)

    if args.question:
        reply(args.question)
        return 0
    print("Ask a question (empty line or Ctrl-D to quit).", file=sys.stderr)
    while True:
        try:
            question = input("\nYou: ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not question or question.lower() in {"quit", "exit"}:
            return 0
        print("Model: ", end="", flush=True)
        reply(question)


def cmd_eval(args) -> int:
    from tqdm import tqdm

    from memchat.evaluate import EvalConfig, build_systems, default_output, evaluate, load_questions, output_paths

    _quiet_transformers()

    cfg = EvalConfig(systems=tuple(s.strip() for s in args.systems.split(",") if s.strip()), top_k=args.top_k,
                     max_new_tokens=args.max_new_tokens, rag_max_new_tokens=args.max_new_tokens,
                     batch_size=args.batch_size, hybrid_strategy=args.hybrid_strategy, limit=args.limit,
                     rag_mode=args.rag_mode, unanswerable=args.unanswerable)
    questions = load_questions(args.eval, cfg.limit, unanswerable=cfg.unanswerable)
    print(f"eval: {len(questions)} questions from {args.eval}; systems {','.join(cfg.systems)}; top_k {cfg.top_k}; "
          f"max_new_tokens {cfg.max_new_tokens}; batch {cfg.batch_size}; hybrid {cfg.hybrid_strategy}; "
          f"rag model {args.rag_model}; fine-tuned {args.model_dir}", file=sys.stderr)
    t0 = time.perf_counter()
    systems, notices, warnings = build_systems(cfg, model_dir=args.model_dir, rag_model=args.rag_model,
                                               base_model=args.base_model)  # model notices are logged as they load
    print(f"models loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    for w in warnings:
        print(f"Warning: {w}", file=sys.stderr)
    bars: dict[str, tqdm] = {}

    def progress(name: str, done: int, total: int) -> None:
        bar = bars.get(name) or bars.setdefault(name, tqdm(total=total, desc=name, unit="q", file=sys.stderr))
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    report = evaluate(questions, systems, cfg, questions_file=str(args.eval), notices=notices + warnings,
                      progress=progress)
    print(report.table())
    json_out, png_out = output_paths(args.out or default_output(args.eval))
    json_path = report.save_json(json_out)
    png_path = report.save_chart(png_out)
    print(f"\nWrote {json_path} and {png_path} ({report.seconds:.0f} s)")
    return 0


def launch_app(args) -> int:
    from memchat.cli import launch_streamlit

    # bound to 127.0.0.1 unless --host (and a password)
    return launch_streamlit(__file__, args.host, args.port, ["streamlit", "--model-dir", args.model_dir])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import logging

    # Library notices (e.g. "model X not available offline; using the bundled one") as one plain line.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    from memchat.cli import run

    if args.mode == "streamlit":
        return run(launch_app, args)
    return run(cmd_eval if args.eval else cmd_chat, args)


from memchat.ui import running_under_streamlit  # noqa: E402

if running_under_streamlit():
    from memchat.ui.finetuned_app import render

    _app_args = argparse.ArgumentParser(add_help=False)
    _app_args.add_argument("--model-dir")
    render(_app_args.parse_known_args(sys.argv[1:])[0].model_dir)  # default: finetuned_model/
elif __name__ == "__main__":
    raise SystemExit(main())
