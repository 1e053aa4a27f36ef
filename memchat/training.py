"""Fine-tuning a conversational model on the question/answer pairs Mem_Chat extracted.

In order, this module:

1. reads and checks ``training_data/faiss_training_data.json`` (format, version, records);
2. turns each pair into token ids with the loss on the answer only. A model without a chat
   template (DialoGPT) sees ``question<eos>answer<eos>``; a model with one sees its own
   template (user = question, assistant = answer), and everything up to the assistant's
   content is masked. ``prompt_ids`` gives the exact prompt a fine-tuned model expects;
3. pads each batch only to its own longest example and groups batches by length, so almost
   no compute goes to padding (``bench/train.py`` measures this against naive padding);
4. runs the Hugging Face ``Trainer`` with the recipe in ``memchat.config.TrainConfig``:
   evaluation on the file's validation split every epoch, the best epoch kept, optional
   early stopping, ``resume`` from the last checkpoint, TensorBoard logs;
5. writes ``finetuned_model/``.

Layout of the output folder::

    finetuned_model/
      config.json  model.safetensors  generation_config.json  tokenizer files
      memchat_model_meta.json   base model, dataset hash and counts, settings, losses, lineage
      runs/<time>_<host>/       TensorBoard: train/loss, train/learning_rate, eval/loss
      checkpoints/              while training: one per epoch (the best and the last kept)
                                and memchat_run.json; removed after a run that finishes,
                                unless keep_checkpoints, since only a resume needs them
                                (each holds the optimizer state, ~3x the weights)

Deliberately left out: choosing the device and precision (``memchat.device``), finding and
loading the base model (``memchat.models``), printing (scripts print; this module logs to
``memchat.training``), packing several pairs into one sequence (length grouping already
leaves little padding on this data, and packing needs per-example attention masks to stay
correct), LoRA, and multi-GPU training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

from memchat import __version__
from memchat.config import (
    DATASET_FILENAME,
    DATASET_FORMAT_VERSION,
    FINETUNED_META_FILENAME,
    TrainConfig,
    finetuned_dir,
    training_dir,
)
from memchat.errors import DatasetError, MemChatError

logger = logging.getLogger(__name__)

DATASET_FORMAT = "memchat-training-data"  # the "format" field extract_faiss_data.py writes
MODEL_META_FORMAT = "memchat-finetuned-model"  # the "format" field of memchat_model_meta.json
MODEL_META_VERSION = 1
CHECKPOINTS_DIRNAME = "checkpoints"
RUNS_DIRNAME = "runs"
RUN_STATE_FILENAME = "memchat_run.json"  # beside the checkpoints: what a resume must match
IGNORE_INDEX = -100  # label value the loss skips (torch's cross_entropy ignore_index)

EXTRACT_HINT = "Make it with: python extract_faiss_data.py"
REMAKE_HINT = "Make it again: python extract_faiss_data.py --restart"
OOM_HINT = (
    "Lower the memory use as the guide suggests: "
    "python train_conversational.py --batch-size 2 --grad-accum 4 --gradient-checkpointing"
)


class TrainingOutOfMemoryError(MemChatError):
    """The accelerator ran out of memory during training."""


# ---------------------------------------------------------------------------
# Options of one run (the recipe itself is TrainConfig)
# ---------------------------------------------------------------------------
@dataclass
class RunOptions:
    """How one run behaves, beside the recipe in ``TrainConfig``."""

    resume: bool = False  # continue from the last checkpoint in <output_dir>/checkpoints
    keep_checkpoints: bool = False  # each holds optimizer state (~3x the weights); only a resume needs them
    max_steps: int = -1  # > 0: stop after this many optimizer steps (quick trials); -1 = the epochs decide
    logging_steps: int = 0  # 0 = auto: about 4 loss lines per epoch, at most one per optimizer step
    save_total_limit: int = 2  # the best and the last epoch: enough to keep the best and to resume
    precision: str = "auto"  # auto = memchat.device's choice (bf16, else fp16, on CUDA; fp32 elsewhere)
    progress: bool = True  # a tqdm bar while training
    # torch.compile the model: fewer, fused kernels. Small models at batch 4 spend most of a
    # GPU step launching kernels, not computing; compiling costs about a minute up front.
    compile: bool = False


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


# ---------------------------------------------------------------------------
# The data file
# ---------------------------------------------------------------------------
@dataclass
class TrainingData:
    """The checked contents of faiss_training_data.json."""

    path: Path
    sha256: str  # of the file's bytes: the fine-tuned model records which data it saw
    train: list[dict]
    validation: list[dict]
    lineage: dict  # {"documents": [{"name", "version", "sha256"}], "store_generation": ...}
    generator_model: str | None = None
    created: str | None = None

    @property
    def counts(self) -> dict:
        return {
            "train": len(self.train),
            "validation": len(self.validation),
            "total": len(self.train) + len(self.validation),
        }


def load_training_data(path: str | Path) -> TrainingData:
    """Read and check the training data file; every problem is one ``DatasetError`` line."""
    path = Path(path)
    if path.is_dir():
        path = path / DATASET_FILENAME
    if not path.exists():
        raise DatasetError(f"No training data at {path}. {EXTRACT_HINT}")
    raw = path.read_bytes()
    if not raw.strip():
        raise DatasetError(f"{path} is empty. {REMAKE_HINT}")
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}). {REMAKE_HINT}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path} is not UTF-8 text. {REMAKE_HINT}") from exc
    if not isinstance(doc, dict) or doc.get("format") != DATASET_FORMAT:
        raise DatasetError(
            f'{path} is not Mem_Chat training data (no "format": "{DATASET_FORMAT}"). {REMAKE_HINT}'
        )
    version = doc.get("format_version")
    if version != DATASET_FORMAT_VERSION:
        raise DatasetError(
            f"{path} has format version {version}; this Mem_Chat reads version {DATASET_FORMAT_VERSION}. "
            f"{REMAKE_HINT}"
        )
    records = doc.get("records")
    if not isinstance(records, list):
        raise DatasetError(f'{path} has no "records" list. {REMAKE_HINT}')
    if not records:
        raise DatasetError(f"{path} holds no question/answer records. Add PDFs, then: python extract_faiss_data.py")

    train: list[dict] = []
    validation: list[dict] = []
    for number, record in enumerate(records, start=1):
        where = f"{path}: record {number}"
        if not isinstance(record, dict):
            raise DatasetError(f"{where} is not a JSON object. {REMAKE_HINT}")
        if record.get("id") is not None:
            where += f" (id {record['id']!r})"
        for key in ("question", "answer"):
            value = record.get(key)
            if not isinstance(value, str) or not value.strip():
                raise DatasetError(f"{where} has no {key}. {REMAKE_HINT}")
        split = record.get("split", "train")
        if split == "train":
            train.append(record)
        elif split == "validation":
            validation.append(record)
        else:
            raise DatasetError(f'{where} has split {split!r}; expected "train" or "validation". {REMAKE_HINT}')
    if not train:
        raise DatasetError(
            f"{path} has no training records (all {len(validation)} are validation). "
            "Add documents, then: python extract_faiss_data.py"
        )
    lineage = doc.get("lineage") if isinstance(doc.get("lineage"), dict) else {}
    return TrainingData(
        path=path,
        sha256=hashlib.sha256(raw).hexdigest(),
        train=train,
        validation=validation,
        lineage=lineage,
        generator_model=doc.get("generator_model"),
        created=doc.get("created"),
    )


# ---------------------------------------------------------------------------
# Prompt format and loss masking
# ---------------------------------------------------------------------------
def uses_chat_template(tokenizer) -> bool:
    """True when the model has a chat template; else the DialoGPT format question<eos>answer<eos>."""
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_format(tokenizer) -> str:
    return "chat_template" if uses_chat_template(tokenizer) else "eos_separated"


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise MemChatError(
            "This tokenizer has neither a chat template nor an end-of-sequence token, so question and "
            "answer cannot be told apart. Choose another base model (--model)."
        )
    return int(tokenizer.eos_token_id)


def _chat_prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def prompt_ids(tokenizer, question: str) -> list[int]:
    """Token ids a model fine-tuned here expects before it writes the answer.

    Inference must feed exactly these (then generate until eos / end of turn): the model
    was trained on ``prompt_ids + answer_ids``.
    """
    question = question.strip()
    if uses_chat_template(tokenizer):
        return list(tokenizer(_chat_prompt(tokenizer, question), add_special_tokens=False)["input_ids"])
    return list(tokenizer(question, add_special_tokens=False)["input_ids"]) + [_eos_id(tokenizer)]


def encode_pairs(tokenizer, questions: Sequence[str], answers: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) per pair; the model sees both, the loss covers the answer ids only.

    The two halves are tokenized apart, so the prompt's ids are exactly ``prompt_ids(question)``:
    what the model is trained to continue is what it is given at inference.
    """
    questions = [q.strip() for q in questions]
    answers = [a.strip() for a in answers]
    if uses_chat_template(tokenizer):
        prompts, completions = [], []
        for question, answer in zip(questions, answers):
            prompt = _chat_prompt(tokenizer, question)
            full = tokenizer.apply_chat_template(
                [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                tokenize=False,
            )
            if not full.startswith(prompt):
                raise MemChatError(
                    "This model's chat template writes the answer turn differently from the prompt it "
                    "generates from, so the answer cannot be masked reliably. Choose another base model (--model)."
                )
            prompts.append(prompt)
            # The answer plus the template's end-of-turn marker (the model learns to stop);
            # trailing whitespace after the marker teaches nothing.
            completions.append(full[len(prompt) :].rstrip())
        prompt_tok = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        answer_tok = tokenizer(completions, add_special_tokens=False)["input_ids"]
        return [(list(p), list(a)) for p, a in zip(prompt_tok, answer_tok)]
    eos = _eos_id(tokenizer)
    prompt_tok = tokenizer(questions, add_special_tokens=False)["input_ids"]
    answer_tok = tokenizer(answers, add_special_tokens=False)["input_ids"]
    return [(list(p) + [eos], list(a) + [eos]) for p, a in zip(prompt_tok, answer_tok)]


@dataclass
class EncodedSplit:
    """One split ready for the Trainer, with what encoding it cost."""

    dataset: Any  # datasets.Dataset: input_ids, labels, length (tokens)
    records: int
    truncated: int = 0  # answer cut to fit max_length
    skipped: int = 0  # the prompt alone filled max_length: nothing left to learn
    tokens: int = 0  # non-padding tokens
    answer_tokens: int = 0  # tokens that carry a label

    def summary(self) -> dict:
        return {
            "records": self.records,
            "examples": len(self.dataset),
            "truncated": self.truncated,
            "skipped": self.skipped,
            "tokens": self.tokens,
            "answer_tokens": self.answer_tokens,
        }


def build_dataset(records: Sequence[dict], tokenizer, max_length: int, *, sort_by_length: bool = False) -> EncodedSplit:
    """Records -> ``datasets.Dataset`` of input_ids, labels (IGNORE_INDEX on the prompt) and length.

    No padding here: the collator pads each batch to its own longest example.
    """
    from datasets import Dataset

    pairs = encode_pairs(tokenizer, [r["question"] for r in records], [r["answer"] for r in records])
    columns: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
    split = EncodedSplit(dataset=None, records=len(records))
    for prompt, answer in pairs:
        if len(prompt) >= max_length:
            split.skipped += 1
            continue
        if len(prompt) + len(answer) > max_length:
            answer = answer[: max_length - len(prompt)]
            split.truncated += 1
        columns["input_ids"].append(prompt + answer)
        columns["labels"].append([IGNORE_INDEX] * len(prompt) + answer)
        columns["length"].append(len(prompt) + len(answer))
        split.tokens += len(prompt) + len(answer)
        split.answer_tokens += len(answer)
    if sort_by_length:  # evaluation: neighbours of similar length pad little
        order = sorted(range(len(columns["length"])), key=columns["length"].__getitem__, reverse=True)
        columns = {k: [v[i] for i in order] for k, v in columns.items()}
    split.dataset = Dataset.from_dict(columns)
    return split


@dataclass
class AnswerOnlyCollator:
    """Pads a batch to its own longest example, never to max_length: tensors of shape (B, T_batch).

    Padding is on the right with attention_mask 0 and label IGNORE_INDEX, so it changes
    neither the attention nor the loss.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None  # 8 on CUDA: tensor-core friendly shapes for a few pad tokens

    def __call__(self, features: list[dict]) -> dict:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(features)
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, longest), dtype=torch.long)
        labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            attention_mask[row, :n] = 1
            labels[row, :n] = torch.as_tensor(feature["labels"], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ---------------------------------------------------------------------------
# Small helpers around transformers
# ---------------------------------------------------------------------------
def _training_arguments(**kwargs):
    """``TrainingArguments`` across transformers 5.x, which renamed a few fields."""
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "activation_checkpointing" not in names:  # before the rename
        kwargs["gradient_checkpointing"] = kwargs.pop("activation_checkpointing")
        kwargs["gradient_checkpointing_kwargs"] = kwargs.pop("activation_checkpointing_kwargs")
    if "train_sampling_strategy" not in names:
        kwargs["group_by_length"] = kwargs.pop("train_sampling_strategy") == "group_by_length"
    return TrainingArguments(**kwargs)


def _out_of_memory_errors() -> tuple[type[BaseException], ...]:
    import torch

    errors = [getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)]
    return tuple(e for e in errors if e is not None)


def _line_for(logs: dict, state) -> str | None:
    """One line per Trainer log event, with units: 'epoch 1.50 step 12/80: loss 2.314, lr 2.9e-04'."""
    where = f"epoch {state.epoch or 0:.2f} step {state.global_step}/{state.max_steps}"
    if "eval_loss" in logs:
        return f"{where}: eval loss {logs['eval_loss']:.4f}"
    if "loss" in logs:
        parts = [f"loss {logs['loss']:.4f}"]
        if "learning_rate" in logs:
            parts.append(f"lr {logs['learning_rate']:.2e}")
        if "grad_norm" in logs:
            parts.append(f"grad norm {logs['grad_norm']:.2f}")
        return f"{where}: " + ", ".join(parts)
    if "train_runtime" in logs:
        return (
            f"trained {state.global_step} steps in {logs['train_runtime']:.1f} s "
            f"({logs.get('train_samples_per_second', 0):.2f} examples/s)"
        )
    return None


def _make_log_callbacks(progress: bool):
    """Callbacks that log one line per event (instead of the Trainer printing dicts)."""
    from transformers import ProgressCallback, TrainerCallback

    class LogLines(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            line = _line_for(logs or {}, state)
            if line and state.is_world_process_zero:
                logger.info(line)

    class BarAndLines(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            line = _line_for(logs or {}, state)
            if line and state.is_world_process_zero:
                logger.info(line)

    return BarAndLines() if progress else LogLines()


def _last_checkpoint(folder: Path) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    if not folder.is_dir():
        return None
    found = get_last_checkpoint(str(folder))
    return Path(found) if found else None


def _step_of(checkpoint: str | Path | None) -> int | None:
    if not checkpoint:
        return None
    try:
        return int(Path(checkpoint).name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------
@dataclass
class TrainResult:
    output_dir: Path
    meta_path: Path
    global_step: int
    epochs: float
    train_loss: float | None  # last logged training loss
    eval_loss: float | None  # best validation loss: the saved model's
    best_epoch: float | None
    stopped_early: bool
    resumed_from_step: int | None
    runtime_s: float
    notice: str | None = None
    meta: dict = field(default_factory=dict)


_CONFIG_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
_OPTION_FIELDS = {f.name for f in dataclasses.fields(RunOptions)}


def setting_names() -> set[str]:
    """Every keyword ConversationalTrainer takes as a setting (TrainConfig + RunOptions fields)."""
    return _CONFIG_FIELDS | _OPTION_FIELDS


class ConversationalTrainer:
    """Fine-tunes ``model_name`` on the pairs in ``dataset_path`` and writes ``output_dir``.

    >>> trainer = ConversationalTrainer(model_name="microsoft/DialoGPT-small",
    ...                                 dataset_path="./training_data/faiss_training_data.json")
    >>> result = trainer.train()

    Any ``TrainConfig`` or ``RunOptions`` field can be given as a keyword
    (``num_train_epochs=3``, ``resume=True``). ``prepare()`` checks the data before it
    loads the model, so bad data fails in a second; ``train()`` calls it if needed.
    """

    def __init__(
        self,
        model_name: str | None = None,
        dataset_path: str | Path | None = None,
        output_dir: str | Path | None = None,
        *,
        config: TrainConfig | None = None,
        options: RunOptions | None = None,
        callbacks: Iterable[Any] = (),
        **overrides: Any,
    ):
        config = dataclasses.replace(config) if config is not None else TrainConfig()
        options = dataclasses.replace(options) if options is not None else RunOptions()
        unknown = set(overrides) - setting_names()
        if unknown:
            raise TypeError(f"ConversationalTrainer got unknown settings: {', '.join(sorted(unknown))}")
        for key, value in overrides.items():
            setattr(config if key in _CONFIG_FIELDS else options, key, value)
        defaults = TrainConfig()
        if model_name is not None:
            config.model_name = model_name
        if dataset_path is not None:
            config.dataset_path = str(dataset_path)
        elif config.dataset_path == defaults.dataset_path:  # the default follows MEMCHAT_HOME
            config.dataset_path = str(training_dir() / DATASET_FILENAME)
        if output_dir is not None:
            config.output_dir = str(output_dir)
        elif config.output_dir == defaults.output_dir:
            config.output_dir = str(finetuned_dir())
        if options.precision not in PRECISIONS:
            raise MemChatError(f"Unknown precision {options.precision!r}; choose one of {', '.join(PRECISIONS)}.")
        self.config = config
        self.options = options
        self.extra_callbacks = list(callbacks)

        self.output_dir = Path(config.output_dir)
        self.checkpoints_dir = self.output_dir / CHECKPOINTS_DIRNAME
        self.data: TrainingData | None = None
        self.model = None
        self.tokenizer = None
        self.resolved = None  # memchat.models.ResolvedModel
        self.train_split: EncodedSplit | None = None
        self.eval_split: EncodedSplit | None = None
        self.device = None
        self.precision: str | None = None  # "bf16" / "fp16" / None (fp32)
        self.last_log_history: list[dict] = []

    # -- setup ---------------------------------------------------------------
    @property
    def notice(self) -> str | None:
        """One line when the base model is not the one asked for (offline fallback)."""
        return getattr(self.resolved, "notice", None) if self.resolved is not None else None

    def prepare(self) -> "ConversationalTrainer":
        """Check the data, load the base model and tokenizer, encode both splits."""
        if self.train_split is not None:
            return self
        cfg = self.config
        if self.data is None:
            self.data = load_training_data(cfg.dataset_path)
        if cfg.early_stopping_patience > 0 and not self.data.validation:
            raise DatasetError(
                f"{self.data.path} has no validation records, and early stopping needs them. "
                "Drop --early-stopping, or extract again with a validation split: python extract_faiss_data.py"
            )
        self._choose_precision()
        if self.model is None:  # (bench/train.py may hand in a model of its own)
            from memchat.models import load_causal_lm

            self.model, self.tokenizer, self.resolved = load_causal_lm(cfg.model_name, training=True)
            # load_causal_lm logs the fallback notice (once); it is also self.notice.
        if self.tokenizer.pad_token_id is None:
            # Padding never reaches the loss or the attention, so any id will do; eos is the convention.
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.train_split = build_dataset(self.data.train, self.tokenizer, cfg.max_length)
        if len(self.train_split.dataset) == 0:
            raise DatasetError(
                f"No training record of {self.data.path} fits in --max-length {cfg.max_length} tokens "
                "with room for an answer. Raise --max-length."
            )
        if self.data.validation:
            self.eval_split = build_dataset(self.data.validation, self.tokenizer, cfg.max_length, sort_by_length=True)
            if len(self.eval_split.dataset) == 0:
                self.eval_split = None
        return self

    def _choose_precision(self) -> None:
        from memchat.device import get_device, mixed_precision

        self.device = get_device()
        wanted = self.options.precision
        if wanted == "auto":
            self.precision = mixed_precision(self.device)
        elif wanted == "fp32":
            self.precision = None
        else:
            if self.device.type != "cuda":
                raise MemChatError(f"--precision {wanted} needs a CUDA GPU; this run is on {self.device}. Use auto.")
            self.precision = wanted

    @property
    def steps_per_epoch(self) -> int:
        n = len(self.train_split.dataset) if self.train_split else 0
        micro_batches = math.ceil(n / self.config.per_device_train_batch_size)
        return max(1, math.ceil(micro_batches / self.config.gradient_accumulation_steps))

    def _logging_steps(self) -> int:
        if self.options.logging_steps > 0:
            return self.options.logging_steps
        return max(1, self.steps_per_epoch // 4)

    def describe(self) -> list[str]:
        """The resolved settings, one line each (printed once by the script)."""
        self.prepare()
        cfg, opt = self.config, self.options
        shown = self.resolved.display_name
        base = cfg.model_name if shown == cfg.model_name else f"{cfg.model_name} -> {shown}"
        effective = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
        n_docs = len(self.data.lineage.get("documents") or [])
        tr = self.train_split
        lines = [
            f"base model     {base} ({sum(p.numel() for p in self.model.parameters()) / 1e6:.1f}M parameters)",
            f"data           {self.data.path} (sha256 {self.data.sha256[:12]}, {self.data.counts['train']} train / "
            f"{self.data.counts['validation']} validation records, {n_docs} documents)",
            f"format         {prompt_format(self.tokenizer)}; loss on {tr.answer_tokens} of {tr.tokens} train tokens "
            f"(answers only); {tr.truncated} truncated, {tr.skipped} skipped at max length {cfg.max_length}",
            f"device         {self.device}, {self.precision or 'fp32'}"
            + (" mixed precision" if self.precision else ""),
            f"schedule       {cfg.num_train_epochs:g} epochs x {self.steps_per_epoch} steps, batch "
            f"{cfg.per_device_train_batch_size} x accumulation {cfg.gradient_accumulation_steps} = {effective}, "
            f"lr {cfg.learning_rate:g} {cfg.lr_scheduler_type}, warmup {cfg.warmup_ratio:g}, "
            f"weight decay {cfg.weight_decay:g}" + (f", max steps {opt.max_steps}" if opt.max_steps > 0 else ""),
            f"memory         gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}, "
            "padding per batch, batches grouped by length",
            f"validation     "
            + (
                f"{len(self.eval_split.dataset)} pairs evaluated each epoch, the best epoch kept"
                + (f", early stopping after {cfg.early_stopping_patience} epochs" if cfg.early_stopping_patience else "")
                if self.eval_split
                else "none in the data file: the last epoch is kept"
            ),
            f"output         {self.output_dir}/ (TensorBoard: {self.output_dir / RUNS_DIRNAME}; "
            f"checkpoints {'kept' if opt.keep_checkpoints else 'removed at the end'})"
            + (" -- resuming" if opt.resume else ""),
        ]
        return lines

    # -- training ------------------------------------------------------------
    def _run_state(self, tb_run: str) -> dict:
        return {
            "dataset_sha256": self.data.sha256,
            "base_model": self.resolved.model_id,
            "tensorboard_run": tb_run,
            "started": _now(),
        }

    def _start_or_resume(self) -> tuple[Path | None, str]:
        """Checkpoint to resume from (or None) and the TensorBoard run folder name."""
        state_path = self.checkpoints_dir / RUN_STATE_FILENAME
        if not self.options.resume:
            if self.checkpoints_dir.exists():
                logger.info(f"removing the checkpoints of an earlier run in {self.checkpoints_dir}")
                shutil.rmtree(self.checkpoints_dir)
            stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
            return None, f"{stamp}_{socket.gethostname()}"
        checkpoint = _last_checkpoint(self.checkpoints_dir)
        if checkpoint is None:
            raise MemChatError(
                f"Nothing to resume: no checkpoint in {self.checkpoints_dir}. "
                "Start a new run: python train_conversational.py"
            )
        saved = json.loads(state_path.read_text(encoding="utf-8")) if state_path.exists() else {}
        if saved.get("dataset_sha256") not in (None, self.data.sha256):
            raise MemChatError(
                f"The checkpoints in {self.checkpoints_dir} were made from other training data "
                f"(sha256 {saved['dataset_sha256'][:12]}, now {self.data.sha256[:12]}). "
                "Start a new run without --resume."
            )
        resolved = self.resolved.model_id
        if saved.get("base_model") not in (None, resolved):
            raise MemChatError(
                f"The checkpoints in {self.checkpoints_dir} were made from {saved['base_model']}, "
                f"not {resolved}. Start a new run without --resume, or resume with --model {saved['base_model']}."
            )
        return checkpoint, saved.get("tensorboard_run") or f"resumed_{_now()}"

    def build_trainer(self, tb_run: str):
        """The Hugging Face Trainer with Mem_Chat's recipe (used by train() and bench/train.py)."""
        from transformers import EarlyStoppingCallback, PrinterCallback, ProgressCallback, Trainer
        from transformers.integrations import TensorBoardCallback

        self.prepare()
        cfg, opt = self.config, self.options
        has_eval = self.eval_split is not None
        args = _training_arguments(
            output_dir=str(self.checkpoints_dir),
            num_train_epochs=cfg.num_train_epochs,
            max_steps=opt.max_steps,
            per_device_train_batch_size=cfg.per_device_train_batch_size,
            per_device_eval_batch_size=cfg.per_device_train_batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            learning_rate=cfg.learning_rate,
            lr_scheduler_type=cfg.lr_scheduler_type,
            warmup_steps=cfg.warmup_ratio,  # a float < 1 is a fraction of all steps
            weight_decay=cfg.weight_decay,
            activation_checkpointing=cfg.gradient_checkpointing,
            # non-reentrant: works with frozen embeddings and inputs that need no grad
            activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
            bf16=self.precision == "bf16",
            fp16=self.precision == "fp16",
            use_cpu=self.device.type == "cpu",
            train_sampling_strategy="group_by_length",
            length_column_name="length",
            remove_unused_columns=False,  # keep "length" for the sampler; the collator picks its columns
            eval_strategy="epoch" if has_eval else "no",
            save_strategy="epoch",
            save_total_limit=opt.save_total_limit,
            load_best_model_at_end=has_eval,
            metric_for_best_model="eval_loss" if has_eval else None,
            greater_is_better=False if has_eval else None,
            logging_strategy="steps",
            logging_steps=self._logging_steps(),
            logging_first_step=True,
            report_to="none",  # TensorBoard is added below with our log folder
            disable_tqdm=not opt.progress,
            seed=cfg.seed,
            dataloader_pin_memory=self.device.type == "cuda",
            torch_compile=opt.compile,
        )
        tensorboard = TensorBoardCallback()
        tensorboard.logging_dir = str(self.output_dir / RUNS_DIRNAME / tb_run)
        callbacks = [tensorboard]
        if has_eval and cfg.early_stopping_patience > 0:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
        trainer = Trainer(
            model=self.model,
            args=args,
            data_collator=AnswerOnlyCollator(
                pad_token_id=self.tokenizer.pad_token_id,
                pad_to_multiple_of=8 if self.device.type == "cuda" else None,
            ),
            train_dataset=self.train_split.dataset,
            eval_dataset=self.eval_split.dataset if has_eval else None,
            processing_class=self.tokenizer,
            callbacks=callbacks + self.extra_callbacks,
        )
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(_make_log_callbacks(opt.progress))
        return trainer

    def train(self) -> TrainResult:
        """Train, keep the best epoch, write output_dir; returns what happened."""
        self.prepare()
        started = time.monotonic()
        checkpoint, tb_run = self._start_or_resume()
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        if checkpoint is None:
            _write_json(self.checkpoints_dir / RUN_STATE_FILENAME, self._run_state(tb_run))
        else:
            logger.info(f"resuming from {checkpoint} (step {_step_of(checkpoint)})")

        trainer = self.build_trainer(tb_run)
        try:
            output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except _out_of_memory_errors() as exc:
            cfg = self.config
            raise TrainingOutOfMemoryError(
                f"Out of GPU memory at batch {cfg.per_device_train_batch_size} x accumulation "
                f"{cfg.gradient_accumulation_steps}, max length {cfg.max_length}"
                f"{', gradient checkpointing on' if cfg.gradient_checkpointing else ''}. {OOM_HINT}"
            ) from exc

        state = trainer.state
        self.last_log_history = list(state.log_history)  # every logged loss / eval / lr, for callers and tests
        result = self._finish(trainer, output, checkpoint, time.monotonic() - started)
        if not self.options.keep_checkpoints:
            shutil.rmtree(self.checkpoints_dir, ignore_errors=True)
        logger.info(
            f"saved {self.output_dir}/ (step {state.global_step}, "
            f"train loss {_fmt(result.train_loss)}, eval loss {_fmt(result.eval_loss)})"
        )
        return result

    def _finish(self, trainer, output, checkpoint, runtime_s: float) -> TrainResult:
        state = trainer.state
        history = state.log_history
        train_losses = [e["loss"] for e in history if "loss" in e]
        eval_entries = [e for e in history if "eval_loss" in e]
        best_epoch = None
        eval_loss = None
        if eval_entries:
            if state.best_metric is not None:
                eval_loss = float(state.best_metric)
                best_step = _step_of(state.best_model_checkpoint)
                best_epoch = next((e.get("epoch") for e in eval_entries if e.get("step") == best_step), None)
            else:
                eval_loss = float(eval_entries[-1]["eval_loss"])
                best_epoch = eval_entries[-1].get("epoch")
        stopped_early = state.global_step < state.max_steps and self.options.max_steps <= 0

        self._save_model(trainer)
        meta = self._meta(state, train_losses, eval_loss, best_epoch, stopped_early, checkpoint, runtime_s, output)
        meta_path = self.output_dir / FINETUNED_META_FILENAME
        _write_json(meta_path, meta)
        return TrainResult(
            output_dir=self.output_dir,
            meta_path=meta_path,
            global_step=state.global_step,
            epochs=float(state.epoch or 0),
            train_loss=train_losses[-1] if train_losses else None,
            eval_loss=eval_loss,
            best_epoch=best_epoch,
            stopped_early=stopped_early,
            resumed_from_step=_step_of(checkpoint),
            runtime_s=runtime_s,
            notice=self.notice,
            meta=meta,
        )

    def _save_model(self, trainer) -> None:
        """Replace the model files in output_dir (runs/ and checkpoints/ stay).

        Written to a side folder first, so a failed save leaves the previous model whole,
        and old files of another base model (a stale tokenizer, shards) never mix in.
        """
        model = trainer.model
        model.config.use_cache = True  # training turned it off; generation wants it
        if getattr(model, "generation_config", None) is not None:
            gen = model.generation_config
            if gen.pad_token_id is None:
                gen.pad_token_id = self.tokenizer.pad_token_id
            if gen.eos_token_id is None:
                gen.eos_token_id = self.tokenizer.eos_token_id
        staging = self.output_dir / ".saving"
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)  # safetensors, config.json, generation_config.json
        self.tokenizer.save_pretrained(staging)
        keep = {RUNS_DIRNAME, CHECKPOINTS_DIRNAME, staging.name}
        for old in self.output_dir.iterdir():
            if old.name in keep:
                continue
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        for new in staging.iterdir():
            new.replace(self.output_dir / new.name)
        staging.rmdir()

    def _meta(self, state, train_losses, eval_loss, best_epoch, stopped_early, checkpoint, runtime_s, output) -> dict:
        cfg = self.config
        resolved = self.resolved
        return {
            "format": MODEL_META_FORMAT,
            "format_version": MODEL_META_VERSION,
            "created": _now(),
            "memchat_version": __version__,
            "base_model": {
                "requested": cfg.model_name,
                "resolved": resolved.model_id,
                "display_name": resolved.display_name,
                "source": resolved.source,
                "notice": self.notice,
            },
            "prompt_format": prompt_format(self.tokenizer),
            "dataset": {
                "path": str(self.data.path),
                "sha256": self.data.sha256,
                "created": self.data.created,
                "generator_model": self.data.generator_model,
                "records": self.data.counts,
                "train": self.train_split.summary(),
                "validation": self.eval_split.summary() if self.eval_split else None,
            },
            "lineage": self.data.lineage,
            "settings": {
                **asdict(cfg),
                **asdict(self.options),
                "device": str(self.device),
                "mixed_precision": self.precision,
            },
            "results": {
                "train_loss": train_losses[-1] if train_losses else None,  # last logged
                "train_loss_mean": float(output.training_loss) if output is not None else None,
                "eval_loss": eval_loss,  # best epoch's: the saved weights
                "best_epoch": best_epoch,
                "global_step": state.global_step,
                "epochs": float(state.epoch or 0),
                "stopped_early": stopped_early,
                "resumed_from_step": _step_of(checkpoint),
                "runtime_s": round(runtime_s, 1),
            },
        }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def read_model_meta(folder: str | Path) -> dict:
    """memchat_model_meta.json of a fine-tuned model folder, checked for format and version."""
    path = Path(folder) / FINETUNED_META_FILENAME
    if not path.exists():
        raise MemChatError(f"{folder} has no {FINETUNED_META_FILENAME}. Train one: python train_conversational.py")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MemChatError(f"{path} is damaged ({exc}). Train again: python train_conversational.py") from exc
    if meta.get("format") != MODEL_META_FORMAT or meta.get("format_version") != MODEL_META_VERSION:
        raise MemChatError(
            f"{path} has format {meta.get('format')!r} version {meta.get('format_version')}; "
            f"this Mem_Chat reads {MODEL_META_FORMAT} version {MODEL_META_VERSION}. Train again."
        )
    return meta
