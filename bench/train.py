"""Training throughput: Mem_Chat's fine-tuning against a naive baseline, same data and model.

    python bench/train.py --threads 1                       # tiny SmolLM2-shaped model on CPU, data from qa_dev
    python bench/train.py --model bundled --steps 2 --threads 1   # the real SmolLM2-135M (minutes)
    python bench/train.py --data training_data/faiss_training_data.json
    python bench/train.py --model gpt2-124m --tokenizer DIR --grad-accum 8 --steps 10   # GPU, the guide's recipe

Mem_Chat  answer-only labels, each batch padded to its own longest example, batches grouped
          by length (memchat.training, through the TRL SFTTrainer it really uses).
naive     every example padded to --max-length, labels on every token (padding included),
          random batches: the classic DialoGPT fine-tuning script.

Both train the same model on the same examples with the same batch, accumulation,
precision and gradient checkpointing. "useful tokens" are the answer tokens: the
non-padding tokens the loss is meant to learn from (the same examples hold the same
answer tokens in both runs). Each variant runs in a subprocess of its own, so its peak
memory is its own: peak RSS on CPU, torch.cuda.max_memory_allocated on GPU. The first
--warmup optimizer steps are not timed.

Without --data (and no training_data/ in MEMCHAT_HOME) the data is made from the shared
qa_dev set: each question answered by the sentence of its paragraph that holds the answer
(the length of an extracted answer), plus two paraphrased questions, 10% held out.

Models with random weights (speed does not depend on the values): --model gpt2-124m is
DialoGPT-small's architecture (GPT-2 small, 124M parameters) for machines that cannot
download DialoGPT; --model tiny (the default) is SmolLM2's architecture cut to 4 small
layers, so a CPU run takes minutes. Their tokenizer comes from --tokenizer (default: the
bundled SmolLM2's, whose vocabulary is close to GPT-2's in size and tokenizes English to
similar lengths). gpt2-124m uses DialoGPT's format (question<eos>answer<eos>), tiny and
bundled SmolLM2's chat template.

On a busy shared 2-core machine --threads 1 gives steadier numbers than torch's default
of 2 threads (which spin against the other load). Timings belong here, never in the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

QA_DEV = Path(os.environ.get("MEMCHAT_QA_DEV", ROOT.parent / "shared" / "data" / "qa_dev"))
H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM datasheet, dense (no sparsity)


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------
def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])", text) if s.strip()]


_PARAPHRASES = ("Could you tell me: {q}", "{q} Please answer from the documents.", "Quick question. {q}")


def make_qa_dev_dataset(path: Path, qa_dev: Path = QA_DEV) -> Path:
    """A memchat-training-data file made from qa_dev: real questions, sentence-long answers."""
    contexts = [json.loads(line) for line in (qa_dev / "contexts.jsonl").read_text().splitlines() if line.strip()]
    questions = {
        q["id"]: q for q in (json.loads(line) for line in (qa_dev / "qa.jsonl").read_text().splitlines() if line.strip())
    }
    records = []
    documents = []
    n_questions = 0
    for ctx in contexts:
        documents.append({"name": ctx["doc"], "version": 1, "sha256": None})
        for p_index, (paragraph, qids) in enumerate(zip(ctx["paragraphs"], ctx["question_ids"])):
            sentences = _sentences(paragraph)
            for qid in qids:
                q = questions.get(qid)
                if q is None:
                    continue
                span = q["answers"][0]
                answer = next((s for s in sentences if span in s), span)
                n_questions += 1
                split = "validation" if n_questions % 10 == 0 else "train"  # 10% of source questions
                base = {
                    "answer": answer,
                    "split": split,
                    "document": ctx["doc"],
                    "doc_version": 1,
                    "page_start": p_index + 1,
                    "page_end": p_index + 1,
                    "chunk_id": p_index,
                    "source_question_id": qid,
                }
                records.append({"id": f"{qid}-0", "question": q["question"], "kind": "original", **base})
                for k, template in enumerate(_PARAPHRASES[:2], start=1):
                    records.append(
                        {"id": f"{qid}-{k}", "question": template.format(q=q["question"]), "kind": "variation", **base}
                    )
    from memchat.formats import DATASET_FORMAT, DATASET_FORMAT_VERSION

    doc = {
        "format": DATASET_FORMAT,
        "format_version": DATASET_FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "generator_model": "qa_dev (SQuAD v1.1 dev) via bench/train.py",
        "settings": {},
        "lineage": {"documents": documents, "store_generation": None},
        "records": records,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    return path


# ---------------------------------------------------------------------------
# One variant (runs in a child process)
# ---------------------------------------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


RANDOM_MODELS = {
    # DialoGPT-small's architecture (GPT-2 small, 124M), for GPU timings without the download.
    "gpt2-124m": dict(n_embd=768, n_layer=12, n_head=12),
    # SmolLM2's architecture cut down (~17M, most of it the 49k-token embedding), so a CPU run
    # of both variants takes minutes even on a busy 2-core machine.
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),
}


def _random_model(kind: str, tokenizer):
    """A model with random weights and the named shapes (see RANDOM_MODELS)."""
    import torch

    torch.manual_seed(0)
    if kind == "gpt2-124m":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=50257, n_positions=1024, bos_token_id=tokenizer.eos_token_id,
                            eos_token_id=tokenizer.eos_token_id, **RANDOM_MODELS[kind])
        return GPT2LMHeadModel(config)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         **RANDOM_MODELS[kind])
    return LlamaForCausalLM(config)


def run_variant(args) -> dict:
    import torch
    from transformers import TrainerCallback
    from transformers.trainer_utils import SaveStrategy

    from memchat.training import IGNORE_INDEX, AnswerOnlyCollator, ConversationalTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(tempfile.mkdtemp(prefix="memchat-bench-"))
    ct = ConversationalTrainer(
        model_name=args.model,
        dataset_path=args.data,
        output_dir=out,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_length=args.max_length,
        gradient_checkpointing=args.gradient_checkpointing,
        max_steps=args.warmup + args.steps,
        progress=False,
        precision=args.precision,
        learning_rate=1e-5,
        compile=args.compile,
    )
    if args.model in RANDOM_MODELS:
        from transformers import AutoTokenizer

        from memchat.device import get_device
        from memchat.models import load_tokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else load_tokenizer("bundled")
        if args.model == "gpt2-124m":
            tok.chat_template = None  # DialoGPT's format: question<eos>answer<eos>
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model = _random_model(args.model, tok).to(get_device())
        ct.model, ct.tokenizer = model, tok

        class _Resolved:
            display_name = f"{args.model} ({type(model).__name__}), random weights"
            model_id = f"{args.model}-random"
            source = "random"
            notice = None

        ct.resolved = _Resolved()
    ct.prepare()
    ct.eval_split = None  # throughput only: no evaluation, no saving
    device = ct.device
    split = ct.train_split

    naive = args.variant == "naive"
    if naive:
        from datasets import Dataset

        pad = ct.tokenizer.pad_token_id
        rows = {"input_ids": [], "attention_mask": [], "labels": [], "n_answer": [], "n_real": []}
        for ids, labels in zip(split.dataset["input_ids"], split.dataset["labels"]):
            n = len(ids)
            padded = ids + [pad] * (args.max_length - n)
            rows["input_ids"].append(padded)
            rows["attention_mask"].append([1] * n + [0] * (args.max_length - n))
            rows["labels"].append(list(padded))  # loss on every token, padding included
            rows["n_answer"].append(sum(1 for x in labels if x != IGNORE_INDEX))
            rows["n_real"].append(n)
        dataset = Dataset.from_dict(rows)
    else:
        dataset = split.dataset.add_column(
            "n_answer", [sum(1 for x in labels if x != IGNORE_INDEX) for labels in split.dataset["labels"]]
        )
        dataset = dataset.add_column("n_real", list(split.dataset["length"]))

    inner = AnswerOnlyCollator(ct.tokenizer.pad_token_id, pad_to_multiple_of=8 if device.type == "cuda" else None)

    def collate(features):
        if naive:
            batch = {k: torch.tensor([f[k] for f in features]) for k in ("input_ids", "attention_mask", "labels")}
        else:
            batch = inner(features)
        batch["_n_answer"] = sum(f["n_answer"] for f in features)
        batch["_n_real"] = sum(f["n_real"] for f in features)
        return batch

    trainer = ct.build_trainer("bench")
    trainer.callback_handler.callbacks = [
        c for c in trainer.callback_handler.callbacks if type(c).__name__ != "TensorBoardCallback"
    ]
    trainer.args.save_strategy = SaveStrategy.NO
    trainer.train_dataset = dataset
    trainer.data_collator = collate
    if naive:
        trainer.args.train_sampling_strategy = "random"
        if hasattr(trainer.args, "group_by_length"):
            trainer.args.group_by_length = False

    counts = {"answer": 0, "real": 0, "padded": 0, "sequences": 0}
    original_compute_loss = trainer.compute_loss

    def counting_compute_loss(model, inputs, *a, **kw):
        if model.training:
            counts["answer"] += int(inputs.pop("_n_answer"))
            counts["real"] += int(inputs.pop("_n_real"))
            counts["padded"] += inputs["input_ids"].numel()
            counts["sequences"] += inputs["input_ids"].shape[0]
        else:
            inputs.pop("_n_answer", None)
            inputs.pop("_n_real", None)
        return original_compute_loss(model, inputs, *a, **kw)

    trainer.compute_loss = counting_compute_loss
    marks: list[tuple[float, dict]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args_, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            marks.append((time.perf_counter(), dict(counts)))

    trainer.add_callback(Clock())
    rss_before = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        trainer.train()
    finally:
        shutil.rmtree(out, ignore_errors=True)

    (t0, c0), (t1, c1) = marks[args.warmup - 1], marks[-1]
    seconds = t1 - t0
    n_params = sum(p.numel() for p in ct.model.parameters())
    n_pos = sum(p.numel() for n, p in ct.model.named_parameters() if "wpe" in n)  # lookups, no matmul
    cfg = ct.model.config
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer")
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")
    real = c1["real"] - c0["real"]
    padded = c1["padded"] - c0["padded"]
    seqs = c1["sequences"] - c0["sequences"]
    result = {
        "variant": args.variant,
        "device": str(device),
        "model": ct.resolved.display_name,
        "params_m": n_params / 1e6,
        "steps_timed": len(marks) - args.warmup,
        "seconds": seconds,
        "sequences": seqs,
        "answer_tokens": c1["answer"] - c0["answer"],
        "real_tokens": real,
        "computed_tokens": padded,
        "useful_tokens_per_s": (c1["answer"] - c0["answer"]) / seconds,
        "real_tokens_per_s": real / seconds,
        "computed_tokens_per_s": padded / seconds,
        "padding_fraction": 1 - real / padded if padded else 0.0,
        "rss_after_load_mb": rss_before,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "precision": ct.precision or "fp32",
    }
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
        result["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        result["peak_gpu_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
        # Model FLOPs (6N per token + attention 12*L*d*T), counted on real tokens only:
        # what the hardware spent on padding is waste, not utilisation.
        mean_len = real / seqs if seqs else 0
        flops_per_token = 6 * (n_params - n_pos) + 12 * layers * hidden * mean_len
        peak = args.peak_tflops or (H100_BF16_DENSE_TFLOPS if "H100" in result["gpu"] else None)
        if peak:
            result["mfu"] = flops_per_token * real / seconds / (peak * 1e12)
            result["peak_tflops"] = peak
    return result


# ---------------------------------------------------------------------------
# Parent: run both, print side by side
# ---------------------------------------------------------------------------
def _child(argv: list[str], variant: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--variant", variant, "--json-out", out]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:])
            raise SystemExit(f"{variant} run failed (exit {proc.returncode})")
        return json.loads(Path(out).read_text())
    finally:
        Path(out).unlink(missing_ok=True)


def _table(rows: list[dict]) -> str:
    mem, naive = rows
    lines = [
        f"model {mem['model']} ({mem['params_m']:.0f}M) on {mem['device']}, {mem['precision']}",
        f"{'':28}{'Mem_Chat':>14}{'naive':>14}{'ratio':>9}",
    ]

    def row(label, key, fmt, ratio=True):
        a, b = mem.get(key), naive.get(key)
        if a is None or b is None:
            return
        r = f"{a / b:>8.2f}x" if ratio and b else ""
        lines.append(f"{label:28}{fmt.format(a):>14}{fmt.format(b):>14}{r}")

    row("useful tokens/s (answers)", "useful_tokens_per_s", "{:.1f}")
    row("non-padding tokens/s", "real_tokens_per_s", "{:.1f}")
    row("computed tokens/s", "computed_tokens_per_s", "{:.1f}")
    row("padding fraction", "padding_fraction", "{:.1%}", ratio=False)
    row("timed seconds", "seconds", "{:.1f}", ratio=False)
    row("sequences timed", "sequences", "{:d}", ratio=False)
    row("peak RSS MB", "peak_rss_mb", "{:.0f}")
    row("peak GPU memory GB", "peak_gpu_mem_gb", "{:.2f}")
    row("peak GPU reserved GB", "peak_gpu_reserved_gb", "{:.2f}")
    row("MFU (real tokens)", "mfu", "{:.1%}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("Data and model")
    g.add_argument("--data", help="memchat-training-data file (default: training_data/ if present, else made from qa_dev)")
    g.add_argument("--model", default="tiny",
                   help="tiny (default: SmolLM2's architecture, 4 layers, random weights), gpt2-124m (DialoGPT-small's "
                        "shapes, random weights), bundled (the real SmolLM2-135M) or any model name")
    g.add_argument("--tokenizer", help="tokenizer folder for tiny / gpt2-124m (default: the bundled SmolLM2's)")
    g = p.add_argument_group("Recipe (the same for both variants)")
    g.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch (the guide: 4)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (the guide: 8)")
    g.add_argument("--max-length", type=int, default=512, help="tokens; the naive run pads every example to this")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute activations in the backward pass (TrainConfig default: on)")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto = memchat.device's choice")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (RunOptions.compile)")
    g = p.add_argument_group("Measurement")
    g.add_argument("--steps", type=int, default=6, help="optimizer steps timed per variant")
    g.add_argument("--warmup", type=int, default=1, help="optimizer steps run first and not timed")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    g.add_argument("--peak-tflops", type=float, default=0.0,
                   help="accelerator peak for MFU (default: H100 bf16 dense, 989, when on an H100)")
    g.add_argument("--only", choices=["memchat", "naive"], help="run one variant")
    g.add_argument("--json", action="store_true", help="also print the results as JSON")
    g.add_argument("--variant", choices=["memchat", "naive"], help=argparse.SUPPRESS)
    g.add_argument("--json-out", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.warmup < 1:
        args.warmup = 1  # the first step is always slow (allocations, lazy init)
    if args.variant:  # child
        result = run_variant(args)
        Path(args.json_out).write_text(json.dumps(result))
        return 0

    made = None
    if not args.data:
        from memchat.config import DATASET_FILENAME, training_dir

        existing = training_dir() / DATASET_FILENAME
        if existing.exists():
            args.data = str(existing)
        else:
            made = Path(tempfile.mkdtemp(prefix="memchat-bench-data-"))
            args.data = str(make_qa_dev_dataset(made / DATASET_FILENAME))
            print(f"data: made from {QA_DEV}")
        argv += ["--data", args.data]
    try:
        return _compare(args, argv)
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)


def _compare(args, argv: list[str]) -> int:
    print(f"data {args.data}; batch {args.batch_size} x accumulation {args.grad_accum}, max length "
          f"{args.max_length}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    variants = [args.only] if args.only else ["memchat", "naive"]
    results = []
    for variant in variants:
        started = time.perf_counter()
        results.append(_child(argv, variant))
        print(f"  {variant}: done in {time.perf_counter() - started:.0f} s")
    if len(results) == 2:
        print(_table(results))
    if args.json or len(results) == 1:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
