"""Fine-tune a conversational model on the question/answer pairs extracted from your PDFs.

    python train_conversational.py                        # training_data/ -> finetuned_model/
    python train_conversational.py --resume               # continue an interrupted run
    python train_conversational.py --epochs 5 --batch-size 2 --grad-accum 4
    python train_conversational.py --model Qwen/Qwen2.5-0.5B-Instruct --config my_settings.json
    python train_conversational.py --model Qwen/Qwen2.5-1.5B-Instruct --lora   # a 1.5B base on a 16 GB card
    python train_conversational.py --no-mix-paraphrases --metric-for-best loss
    python train_conversational.py --dataset my_pairs.jsonl   # your own {question, answer} / {instruction, output} / {messages}
    accelerate launch --num_processes 2 train_conversational.py   # several GPUs (or --cpu processes)
    tensorboard --logdir ./finetuned_model/runs           # loss, knowledge F1/contains, learning rate

Reads training_data/faiss_training_data.json (or your own file) and writes finetuned_model/
(weights, tokenizer, memchat_model_meta.json, README.md model card) with TensorBoard logs
in finetuned_model/runs. Each epoch the held-out validation questions are answered; the
epoch that answers them best is kept.
Offline, when microsoft/DialoGPT-small cannot be loaded, the bundled SmolLM2-135M-Instruct
is the base model (a notice says so). Settings: defaults < --config FILE.json < flags.

Errors: one line on stderr, exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys

SCHEDULERS = ["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial", "inverse_sqrt"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from memchat.config import RunOptions, TrainConfig
    from memchat.probe import METRICS
    from memchat.training import PRECISIONS

    d, o = TrainConfig(), RunOptions()
    p = argparse.ArgumentParser(
        prog="train_conversational.py",
        description="Fine-tune a conversational model on training_data/ and write finetuned_model/.",
    )
    # Every default is None here, so only flags actually given override --config and TrainConfig.
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", metavar="PATH", help="training data file or folder (default: training_data/)")
    g.add_argument("--model", metavar="NAME", help=f"base model: hub id or local folder (default: {d.model_name})")
    g.add_argument("--output-dir", metavar="DIR", help="where the model goes (default: finetuned_model/)")
    g.add_argument("--config", metavar="FILE.json", help="JSON object of settings (TrainConfig / RunOptions field names)")
    g.add_argument("--max-length", type=_positive_int, metavar="N",
                   help=f"tokens of question + answer; longer answers are cut (default: {d.max_length})")
    g.add_argument("--drop-system-prompt", dest="drop_default_system_prompt", action=argparse.BooleanOptionalAction,
                   default=None, help="empty the base template's default system prompt in training and in the saved "
                   f"template (default: {'on' if d.drop_default_system_prompt else 'off'})")

    g = p.add_argument_group("training mix (each part on by default)")
    for part, what in (("documents", "the chunks' own text, loss on every token"),
                       ("qa", "the generated questions and answers"),
                       ("paraphrases", "the paraphrased questions"),
                       ("restatements", "wh / cloze / about / fact-list items made from the sentences")):
        g.add_argument(f"--mix-{part}", dest=f"mix_{part}", action=argparse.BooleanOptionalAction, default=None,
                       help=what)


    g = p.add_argument_group("LoRA (PEFT)")
    g.add_argument("--lora", action="store_true", default=None,
                   help="train a LoRA adapter instead of all weights (merged into the saved model)")
    g.add_argument("--lora-r", type=_positive_int, metavar="R", help=f"adapter rank (default: {d.lora_r})")
    g.add_argument("--lora-alpha", type=_positive_int, metavar="A", help=f"adapter scaling (default: {d.lora_alpha})")
    g.add_argument("--lora-targets", metavar="NAMES",
                   help=f"comma-separated module names, or all-linear (default: {d.lora_target_modules})")

    g = p.add_argument_group("schedule")
    g.add_argument("--epochs", type=_positive_float, metavar="N", help=f"passes over the data (default: {d.num_train_epochs:g})")
    g.add_argument("--batch-size", type=_positive_int, metavar="N",
                   help=f"examples per forward pass (default: {d.per_device_train_batch_size})")
    g.add_argument("--grad-accum", type=_positive_int, metavar="N",
                   help=f"forward passes per optimizer step (default: {d.gradient_accumulation_steps})")
    g.add_argument("--lr", type=_positive_float, metavar="RATE", help=f"peak learning rate (default: {d.learning_rate:g})")
    g.add_argument("--scheduler", choices=SCHEDULERS, help=f"learning-rate schedule (default: {d.lr_scheduler_type})")
    g.add_argument("--warmup-ratio", type=_fraction, metavar="F",
                   help=f"fraction of the steps spent warming up (default: {d.warmup_ratio:g})")
    g.add_argument("--weight-decay", type=float, metavar="F", help=f"AdamW weight decay (default: {d.weight_decay:g})")
    g.add_argument("--max-steps", type=_positive_int, metavar="N", help="stop after N optimizer steps (a quick trial)")
    g.add_argument("--seed", type=int, help=f"random seed (default: {d.seed})")

    g = p.add_argument_group("memory and speed")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help=f"recompute activations to save memory (default: {'on' if d.gradient_checkpointing else 'off'})")
    g.add_argument("--precision", choices=PRECISIONS,
                   help=f"auto: bf16 (else fp16) mixed precision on CUDA, fp32 elsewhere; bf16 also works on a CPU "
                        f"(autocast, float32 weights; 1.5x the tokens/s on CPUs with bf16 instructions) "
                        f"(default: {o.precision})")
    g.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the model: faster GPU steps after about a minute of compiling")

    g = p.add_argument_group("validation and checkpoints")
    g.add_argument("--metric-for-best", choices=METRICS,
                   help="what picks the saved epoch and stops early: the validation questions' answers "
                        f"(knowledge_f1, knowledge_contains) or the answer-token loss (default: {d.metric_for_best})")
    g.add_argument("--knowledge-questions", type=int, metavar="N",
                   help=f"validation questions answered each epoch, 0 = all (default: {d.knowledge_questions})")
    g.add_argument("--early-stopping", type=int, metavar="EPOCHS",
                   help=f"stop after EPOCHS epochs without a better --metric-for-best, 0 = off "
                        f"(default: {d.early_stopping_patience})")
    g.add_argument("--resume", action="store_true", default=None,
                   help="continue from the last checkpoint in finetuned_model/checkpoints")
    g.add_argument("--keep-checkpoints", action="store_true", default=None,
                   help="keep finetuned_model/checkpoints after a finished run (default: removed). Each checkpoint "
                        "holds the weights and the optimizer state, about 3x the model: 1.6 GB for the bundled "
                        "135M model in fp32, times --save-total-limit")
    g.add_argument("--save-total-limit", type=_positive_int, metavar="N",
                   help=f"checkpoints kept while training, the best among them (default: {o.save_total_limit})")
    g.add_argument("--logging-steps", type=_positive_int, metavar="N",
                   help="optimizer steps between loss lines (default: about 4 per epoch)")

    g = p.add_argument_group("output")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


# flag -> TrainConfig / RunOptions field
_FLAG_FIELDS = {
    "dataset": "dataset_path",
    "model": "model_name",
    "output_dir": "output_dir",
    "max_length": "max_length",
    "epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "lr": "learning_rate",
    "scheduler": "lr_scheduler_type",
    "warmup_ratio": "warmup_ratio",
    "weight_decay": "weight_decay",
    "max_steps": "max_steps",
    "seed": "seed",
    "gradient_checkpointing": "gradient_checkpointing",
    "precision": "precision",
    "compile": "compile",
    "early_stopping": "early_stopping_patience",
    "resume": "resume",
    "keep_checkpoints": "keep_checkpoints",
    "save_total_limit": "save_total_limit",
    "logging_steps": "logging_steps",
    "mix_documents": "mix_documents",
    "mix_qa": "mix_qa",
    "mix_paraphrases": "mix_paraphrases",
    "mix_restatements": "mix_restatements",
    "lora": "lora",
    "lora_r": "lora_r",
    "lora_alpha": "lora_alpha",
    "lora_targets": "lora_target_modules",
    "metric_for_best": "metric_for_best",
    "knowledge_questions": "knowledge_questions",
    "drop_default_system_prompt": "drop_default_system_prompt",
}


def settings_from(args) -> dict:
    """defaults < --config file < flags, as keyword settings for ConversationalTrainer."""
    from memchat.errors import MemChatError
    from memchat.training import setting_names

    settings: dict = {}
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as f:
                loaded = json.load(f)
        except OSError as exc:
            raise MemChatError(f"Cannot read --config {args.config}: {exc.strerror}.") from exc
        except json.JSONDecodeError as exc:
            raise MemChatError(f"--config {args.config} is not valid JSON ({exc.msg} at line {exc.lineno}).") from exc
        if not isinstance(loaded, dict):
            raise MemChatError(f"--config {args.config} must hold a JSON object of settings.")
        unknown = sorted(set(loaded) - setting_names())
        if unknown:
            raise MemChatError(
                f"--config {args.config} has unknown settings: {', '.join(unknown)}. "
                f"Known: {', '.join(sorted(setting_names()))}."
            )
        settings.update(loaded)
    for flag, name in _FLAG_FIELDS.items():
        value = getattr(args, flag)
        if value is not None:
            settings[name] = value
    if args.quiet:
        settings["progress"] = False
    return settings


def _setup_logging() -> None:
    """Library lines (memchat.*) printed one per event; transformers' own chatter off."""
    import logging

    class Lines(logging.Formatter):
        def format(self, record):
            message = record.getMessage()
            return f"Note: {message}" if record.levelno >= logging.WARNING else message

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(Lines())
    root = logging.getLogger("memchat")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # weight loading / shard writing bars


def main(argv: list[str] | None = None) -> int:
    from memchat.cli import run

    args = build_parser().parse_args(argv)
    return run(train, args, interrupted="interrupted: the last epoch's checkpoint is kept; continue with: "
                                        "python train_conversational.py --resume")


def train(args) -> int:
    import logging

    from tqdm.contrib.logging import logging_redirect_tqdm

    from memchat.device import is_main_process
    from memchat.training import ConversationalTrainer

    _setup_logging()
    trainer = ConversationalTrainer(**settings_from(args))
    lines = trainer.describe()  # checks the data first, then loads the model
    if is_main_process():  # accelerate / torchrun: the main process prints
        print("settings:\n" + "\n".join(f"  {line}" for line in lines), flush=True)
    with logging_redirect_tqdm(loggers=[logging.getLogger("memchat")]):
        result = trainer.train()

    if not is_main_process():  # accelerate / torchrun: the main process reports
        return 0
    metric = trainer.config.metric_for_best
    if result.stopped_early:
        print(f"stopped early after epoch {result.epochs:.0f}: validation {metric} stopped improving")
    for row in result.knowledge:
        print(f"epoch {row['epoch'] or 0:.0f}: eval loss {row['eval_loss']:.4f}"
              + (f", knowledge F1 {row['knowledge_f1']:.1f}, contains {row['knowledge_contains']:.1f}%"
                 if "knowledge_f1" in row else ""))
    best = (f", best epoch {result.best_epoch:.0f} ({metric} {result.best_metric:.3g})"
            if result.best_epoch and result.best_metric is not None else "")
    print(f"done: {result.global_step} steps in {result.runtime_s:.0f} s{best}; model in {result.output_dir}/")
    print(f"curves: tensorboard --logdir {result.output_dir}/runs")
    print("try it: python test_finetuned_model.py")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
