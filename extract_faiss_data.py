"""Turn the encrypted knowledge base into fine-tuning data.

    python extract_faiss_data.py                      # questions, answers and paraphrases for every chunk
    python extract_faiss_data.py --max-chunks 20      # a quick look at the first 20 chunks
    python extract_faiss_data.py --no-augment --pairs-per-chunk 2 --batch-size 8
    python extract_faiss_data.py --restart            # throw away earlier results and start over
    python extract_faiss_data.py --llm-server http://127.0.0.1:8000/v1   # generate on vLLM / llama-server / Ollama

Reads encrypted_faiss_storage/ (with the app's key rules) and writes
training_data/faiss_training_data.json, training_stats.json, and train.jsonl /
validation.jsonl (messages form) + documents.jsonl for other trainers.
An interrupted run resumes where it stopped; after adding or changing PDFs only
new or changed chunks are generated. training_data/ is owner-only and, with --encrypt,
encrypted with the store's key.

Errors: one line on stderr, exit code 1.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from memchat.config import ANSWER_WRITERS, PARAPHRASE_WRITERS, ExtractConfig

    d = ExtractConfig()
    p = argparse.ArgumentParser(
        prog="extract_faiss_data.py",
        description="Generate question/answer training data from the encrypted knowledge base.",
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model_name,
                   help=f"instruct model that writes questions and answers: hub id or local folder (default {d.model_name}; "
                        "offline, the bundled SmolLM2-135M-Instruct is used, with a notice)")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"prompts per generate call (default {d.batch_size}); lower it if memory runs out")
    g.add_argument("--llm-server", default=None, metavar="URL",
                   help="OpenAI-compatible server that writes the text instead of this process, e.g. "
                        "http://127.0.0.1:8000/v1 (vllm serve, llama-server, Ollama, main.py serve); requests go "
                        "concurrently so the server batches them (default $MEMCHAT_LLM_SERVER; key in $MEMCHAT_LLM_API_KEY)")
    g.add_argument("--llm-model", default=None, help="model name on that server (default: the first it lists)")

    g = p.add_argument_group("what to generate")
    g.add_argument("--pairs-per-chunk", type=int, default=d.max_pairs_per_chunk, metavar="N",
                   help=f"questions per chunk, 1 to 5 (default {d.max_pairs_per_chunk})")
    aug = g.add_mutually_exclusive_group()
    aug.add_argument("--augment", dest="augment", action="store_true", default=d.augment,
                     help="also write paraphrases of each question that share its answer (default)")
    aug.add_argument("--no-augment", dest="augment", action="store_false", help="originals only, no paraphrases")
    g.add_argument("--variations", type=int, default=d.variations_per_question, metavar="N",
                   help=f"paraphrases per question with --augment (default {d.variations_per_question})")
    g.add_argument("--max-chunks", type=int, default=None, metavar="N",
                   help="use only the first N chunks of the knowledge base (a quick look, CI); default all")
    g.add_argument("--validation-families", type=int, default=d.validation_families_per_chunk, metavar="N",
                   help="question families (a question + its paraphrases) held out for validation per chunk with two "
                        f"or more; every chunk is still trained on (default {d.validation_families_per_chunk})")
    g.add_argument("--probe-questions", type=int, default=d.probe_questions_per_chunk, metavar="N",
                   help="span probes per chunk: validation wh questions about answer spans no training item asks "
                        f"for, in trained sentences; nothing leaves training for them (default {d.probe_questions_per_chunk})")
    g.add_argument("--no-documents", dest="documents", action="store_false", default=d.include_documents,
                   help="leave out the chunks' own text (plain language-model examples)")
    g.add_argument("--no-restatements", dest="restatements", action="store_false", default=d.include_restatements,
                   help="leave out the wh/cloze/about/fact-list items made from the sentences")
    g.add_argument("--no-questions", dest="questions", action="store_false", default=d.generate_questions,
                   help="no generator at all: only the chunks' text and the restatements (fast on a CPU; "
                        "no validation questions)")
    g.add_argument("--spans-per-sentence", type=int, default=d.restatement_spans_per_sentence, metavar="N",
                   help=f"answer spans asked about per sentence (default {d.restatement_spans_per_sentence})")
    g.add_argument("--answer-writer", choices=ANSWER_WRITERS, default=d.answer_writer,
                   help="who answers the generated questions: the chunk sentence that best answers it (sentence), "
                        "the extractive reader's span of the chunk (reader; neither generates), the model (written, "
                        "then grounded; a failed answer gets the sentence), or auto: sentence for in-process models "
                        f"under 1B parameters, the model otherwise (default {d.answer_writer})")
    g.add_argument("--paraphrase-writer", choices=PARAPHRASE_WRITERS, default=d.paraphrase_writer,
                   help="who paraphrases the questions with --augment: framings of the question only (template, no "
                        "generation), the model (then filtered; framings fill up), or auto: templates for in-process "
                        f"models under 1B parameters, the model otherwise (default {d.paraphrase_writer})")

    g = p.add_argument_group("output and resuming")
    g.add_argument("--output-dir", default=None,
                   help="folder for faiss_training_data.json and training_stats.json (default training_data/)")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="reuse finished chunks from an earlier or interrupted run (the default)")
    mode.add_argument("--restart", action="store_true", help="discard earlier results and generate everything again")
    g.add_argument("--encrypt", action="store_true", default=d.encrypt,
                   help="write training_data/ encrypted with the store's key (train_conversational.py reads it; "
                        "other trainers cannot)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    from memchat.cli import run

    args = build_parser().parse_args(argv)
    return run(extract, args,
               interrupted="interrupted: finished chunks are saved; run the same command again to resume")


def extract(args) -> int:
    from memchat.config import ExtractConfig
    from memchat.extraction import FAISSDataExtractor

    cfg = ExtractConfig(
        model_name=args.model,
        max_pairs_per_chunk=args.pairs_per_chunk,
        augment=args.augment,
        variations_per_question=args.variations,
        batch_size=args.batch_size,
        validation_families_per_chunk=args.validation_families,
        probe_questions_per_chunk=args.probe_questions,
        include_documents=args.documents,
        include_restatements=args.restatements,
        restatement_spans_per_sentence=args.spans_per_sentence,
        generate_questions=args.questions,
        encrypt=args.encrypt,
        max_chunks=args.max_chunks,
        answer_writer=args.answer_writer,
        paraphrase_writer=args.paraphrase_writer,
    )
    print(
        f"settings: model={cfg.model_name} pairs_per_chunk={cfg.max_pairs_per_chunk} augment={cfg.augment} "
        f"variations={cfg.variations_per_question if cfg.augment else 0} batch_size={cfg.batch_size} "
        f"max_chunks={cfg.max_chunks or 'all'} validation_families={cfg.validation_families_per_chunk} "
        f"probe_questions={cfg.probe_questions_per_chunk} "
        f"documents={cfg.include_documents} restatements={cfg.include_restatements} encrypt={cfg.encrypt} "
        f"answer_writer={cfg.answer_writer} paraphrase_writer={cfg.paraphrase_writer} "
        f"{'restart' if args.restart else 'resume'}",
        flush=True,
    )
    from memchat.llm_client import LLMServerClient, server_url

    generator = None  # in-process, loaded by the extractor only if some chunk needs generating
    if server_url(args.llm_server):
        generator = LLMServerClient(args.llm_server, args.llm_model, fallback_model=cfg.model_name)
        print(f"generation: {generator.resolved.display_name}, up to {generator.cfg.concurrency} requests at once",
              flush=True)
    extractor = FAISSDataExtractor(extract_config=cfg, generator=generator, output_dir=args.output_dir,
                                   progress=not args.quiet, notify=lambda line: print(line, file=sys.stderr, flush=True))
    path = extractor.create_training_dataset(restart=args.restart)
    from memchat import fsperm

    fsperm.tighten_tree(extractor.output_dir)  # whatever a library left 0644 there (its lock file)

    r = extractor.report
    run, overall = r.stats["run"], r.stats["overall"]
    print(f"chunks: {r.chunks_selected} ({r.chunks_generated} generated, {r.chunks_reused} reused from earlier runs)")
    print(
        f"records: {r.records} ({overall['records_train']} train, {overall['records_validation']} validation); "
        f"questions kept {overall['questions_kept']} of {overall['questions_generated']}, "
        f"paraphrases kept {overall['variations_kept']}; answers: {overall['answers']['reader']} by the reader, "
        f"{overall['answers']['model']} by the model, {overall['answers']['extractive']} the chunk's best sentence"
    )
    if run.get("generated_tokens"):
        print(
            f"generation: {run['generated_tokens']} tokens in {run['generation_time_s']:.1f} s "
            f"({run['tokens_per_s']} tokens/s), wall time {run['wall_time_s']:.1f} s of which loading models "
            f"{run['model_load_s']:.1f} s, model {r.stats['generation']['model']}"
        )
    print(f"wrote {path} and {r.stats_path}")
    kinds = ", ".join(f"{k} {n}" for k, n in overall["records_by_kind"].items())
    print(f"records by kind: {kinds}; validation families {overall['families_validation']}, "
          f"span probes {overall['span_probes']}")
    if not cfg.encrypt:
        print("Note: training_data/ is not encrypted (owner-only files); it holds your documents' content in plain "
              "text. --encrypt encrypts it with the store's key.")
    if r.records == 0:
        print(f"error: no question survived the filters (reasons in {r.stats_path}); "
              "try a larger --model, or more chunks", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
