"""The trainer: fine-tuning a conversational model on the extracted data, on TRL's ``SFTTrainer``.

In order, ``ConversationalTrainer``:

1. reads the data (``memchat.training_data``: Mem_Chat's dataset or a user's own file) and
   keeps the parts of the training mix switched on (documents, QA, paraphrases, restatements);
2. encodes them once (``memchat.prompting``): a model with a chat template sees its own
   template, DialoGPT sees ``question<eos>answer<eos>``; the loss is on the answer only,
   and on every token of a document. The dataset reaches ``SFTTrainer`` tokenized, with
   its labels, so TRL neither re-tokenizes nor re-masks it: the ids are ours, the same
   that inference feeds. TRL pads each batch to its own longest example, computes the
   loss only where a label is, and batches are grouped by length;
3. each epoch evaluates the answer-token loss on the validation records (question families
   and span probes) AND asks their questions greedily (``memchat.probe``): ``knowledge_f1`` /
   ``knowledge_contains``, logged to TensorBoard next to the loss. The best epoch (by
   ``metric_for_best``, knowledge by default, ties broken by the loss) is kept, and early
   stopping watches the same score;
4. with ``lora`` trains a PEFT LoRA adapter instead of all weights, and merges it at the end;
5. writes ``finetuned_model/``: weights, tokenizer (a template-less one gets a chat template
   that reproduces its training format), ``memchat_model_meta.json`` (mix, curve, chosen
   epoch) and a model card ``README.md``; every file owner-only (``memchat.fsperm``).

Layout of the output folder::

    finetuned_model/
      config.json  model.safetensors  generation_config.json  tokenizer files  README.md
      memchat_model_meta.json   base model, data and mix, settings, losses, knowledge curve, lineage
      runs/<time>_<host>/       TensorBoard: train/loss, eval/loss, eval/knowledge_f1, eval/knowledge_contains
      checkpoints/              while training: one per epoch (the best and the last kept)
                                and memchat_run.json; removed after a run that finishes,
                                unless keep_checkpoints, since only a resume needs them

Accelerate / torchrun launch the same script on several processes (``accelerate launch
--num_processes 2 train_conversational.py``): the Trainer shards the batches; every
process probes, the main one writes. Deliberately left out: choosing the device and
precision (``memchat.device``), finding and loading the base model (``memchat.models``),
printing (scripts print; this module logs to ``memchat.training``), packing several
examples into one sequence, and quantised (QLoRA) bases.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from memchat import __version__, formats, fsperm
from memchat.config import (
    DATASET_FILENAME,
    FINETUNED_META_FILENAME,
    RunOptions,
    TrainConfig,
    finetuned_dir,
    training_dir,
)
from memchat.device import is_main_process
from memchat.errors import DatasetError, MemChatError, TrainingOutOfMemoryError
from memchat.formats import MODEL_META_FORMAT, MODEL_META_VERSION, read_model_meta  # noqa: F401  (re-exported)
from memchat.probe import METRICS, SELECTION_KEY, KnowledgeProbe, selection_score
from memchat.prompting import drop_default_system_prompt
from memchat.prompting import encode_pairs, prompt_format, prompt_ids, uses_chat_template  # noqa: F401  (re-exported)
from memchat.training_data import (  # noqa: F401  (re-exported: the old names of this module)
    IGNORE_INDEX,
    AnswerOnlyCollator,
    EncodedSplit,
    TrainingData,
    build_dataset,
    load_training_data,
)

logger = logging.getLogger(__name__)

CHECKPOINTS_DIRNAME = "checkpoints"
RUNS_DIRNAME = "runs"
RUN_STATE_FILENAME = "memchat_run.json"  # beside the checkpoints: what a resume must match

OOM_HINT = (
    "Lower the memory use as the guide suggests: "
    "python train_conversational.py --batch-size 2 --grad-accum 4 --gradient-checkpointing (or --lora)"
)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


# ---------------------------------------------------------------------------
# Small helpers around transformers
# ---------------------------------------------------------------------------
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
    fsperm.write_private(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _sft_trainer_class():
    """``trl.SFTTrainer`` that also runs the knowledge probe in each evaluation."""
    from trl import SFTTrainer

    class MemChatSFTTrainer(SFTTrainer):
        probe: KnowledgeProbe | None = None
        knowledge_metric: str = "knowledge_f1"  # the probe figure that, with the loss as tie-break, picks the epoch

        def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                            metric_key_prefix="eval"):
            output = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                             ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
            if self.probe is not None and self.probe.questions:
                model = self.accelerator.unwrap_model(self.model)
                scores = self.probe.run(model, self.processing_class, epoch=self.state.epoch,
                                        step=self.state.global_step)
                for key, value in scores.items():
                    output.metrics[f"{metric_key_prefix}_{key}"] = value
                loss = output.metrics.get(f"{metric_key_prefix}_loss")
                if loss is not None:
                    self.probe.history[-1]["loss"] = round(float(loss), 4)
                if self.knowledge_metric in scores:
                    output.metrics[f"{metric_key_prefix}_{SELECTION_KEY}"] = selection_score(
                        scores[self.knowledge_metric], None if loss is None else float(loss))
            return output

    return MemChatSFTTrainer


def _sft_config(**kwargs):
    """``trl.SFTConfig`` (TrainingArguments + SFT fields) across transformers 5.x field renames."""
    from trl import SFTConfig

    names = {f.name for f in dataclasses.fields(SFTConfig)}
    if "activation_checkpointing" not in names:  # before the rename
        kwargs["gradient_checkpointing"] = kwargs.pop("activation_checkpointing")
        kwargs["gradient_checkpointing_kwargs"] = kwargs.pop("activation_checkpointing_kwargs")
    if "train_sampling_strategy" not in names:
        kwargs["group_by_length"] = kwargs.pop("train_sampling_strategy") == "group_by_length"
    return SFTConfig(**kwargs)


def _lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    targets = cfg.lora_target_modules.strip()
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()],
        task_type="CAUSAL_LM",
    )


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
    best_metric: float | None = None  # the saved epoch's metric_for_best value
    knowledge: list = field(default_factory=list)  # per evaluation: epoch, step, knowledge_f1/contains, loss


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
        self.probe: KnowledgeProbe | None = None
        self.dropped_system_prompt: str | None = None  # the base template's default system text, emptied
        if config.metric_for_best not in METRICS:
            raise MemChatError(f"Unknown metric_for_best {config.metric_for_best!r}; choose one of {', '.join(METRICS)}.")

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
            self.data = load_training_data(cfg.dataset_path).select(self.mix)
        if not self.data.validation and cfg.early_stopping_patience > 0:
            logger.info(f"{self.data.path} has no validation questions: no early stopping, the last epoch is kept")
        self._choose_precision()
        if self.model is None:  # (bench/train.py may hand in a model of its own)
            from memchat.models import load_causal_lm

            self.model, self.tokenizer, self.resolved = load_causal_lm(cfg.model_name, training=True)
            # load_causal_lm logs the fallback notice (once); it is also self.notice.
        if self.tokenizer.pad_token_id is None:
            # Padding never reaches the loss or the attention, so any id will do; eos is the convention.
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if cfg.drop_default_system_prompt and self.dropped_system_prompt is None:
            # before any encoding: training, the probe and the saved template all see the emptied prompt
            self.dropped_system_prompt = drop_default_system_prompt(self.tokenizer)
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
        if self.eval_split is not None and cfg.metric_for_best != "loss" or cfg.knowledge_questions and self.eval_split:
            self.probe = KnowledgeProbe.from_records(self.data.validation, limit=cfg.knowledge_questions,
                                                     max_new_tokens=cfg.knowledge_max_new_tokens)
        return self

    @property
    def mix(self) -> dict[str, bool]:
        c = self.config
        return {"documents": c.mix_documents, "qa": c.mix_qa, "paraphrases": c.mix_paraphrases,
                "restatements": c.mix_restatements}

    def _choose_precision(self) -> None:
        from memchat.device import get_device, mixed_precision

        self.device = get_device()
        wanted = self.options.precision
        if wanted == "auto":
            self.precision = mixed_precision(self.device)
        elif wanted == "fp32":
            self.precision = None
        else:
            if self.device.type != "cuda" and not (wanted == "bf16" and self.device.type == "cpu"):
                raise MemChatError(f"--precision {wanted} needs a CUDA GPU; this run is on {self.device}. Use auto"
                                   + (" or bf16 (CPU autocast)." if self.device.type == "cpu" else "."))
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
            f"(answers, and whole documents); {tr.truncated} truncated, {tr.skipped} skipped at max length {cfg.max_length}"
            + ("; the template's default system prompt emptied" if self.dropped_system_prompt else ""),
            "mix            " + ", ".join(f"{part} {'on' if on else 'off'}" for part, on in self.mix.items())
            + "; examples " + ", ".join(f"{k} {v}" for k, v in sorted(tr.by_part.items())),
            f"training       {'LoRA r ' + str(cfg.lora_r) + ', alpha ' + str(cfg.lora_alpha) + ', on ' + cfg.lora_target_modules + ' (merged when saved)' if cfg.lora else 'all weights'} on TRL SFTTrainer",
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
                f"{len(self.eval_split.dataset)} held-out questions: answer-token loss"
                + (f" and {len(self.probe.questions)} answered greedily (<= {cfg.knowledge_max_new_tokens} tokens)"
                   if self.probe else "")
                + f" each epoch; the best epoch by {cfg.metric_for_best}"
                + (" (a tie: the lower loss)" if self.probe and cfg.metric_for_best != "loss" else "") + " kept"
                + (f", early stopping after {cfg.early_stopping_patience} epochs without one" if cfg.early_stopping_patience else "")
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
            if self.checkpoints_dir.exists() and is_main_process():  # the others would delete what it writes next
                logger.info(f"removing the checkpoints of an earlier run in {self.checkpoints_dir}")
                shutil.rmtree(self.checkpoints_dir, ignore_errors=True)
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
        """TRL's SFTTrainer with Mem_Chat's recipe (used by train() and bench/train.py)."""
        from transformers import EarlyStoppingCallback, PrinterCallback, ProgressCallback
        from transformers.integrations import TensorBoardCallback

        self.prepare()
        cfg, opt = self.config, self.options
        has_eval = self.eval_split is not None
        if cfg.metric_for_best == "loss" or self.probe is None:
            best_metric, greater = "eval_loss", False
        else:
            best_metric, greater = f"eval_{SELECTION_KEY}", True  # metric_for_best, ties broken by the loss
        args = _sft_config(
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
            metric_for_best_model=best_metric if has_eval else None,
            greater_is_better=greater if has_eval else None,
            logging_strategy="steps",
            logging_steps=self._logging_steps(),
            logging_first_step=True,
            report_to="none",  # TensorBoard is added below with our log folder
            disable_tqdm=not opt.progress,
            seed=cfg.seed,
            dataloader_pin_memory=self.device.type == "cuda",
            torch_compile=opt.compile,
            # SFT: the data arrives tokenized with its labels (memchat.training_data), padded per batch
            max_length=cfg.max_length,
            packing=False,
            padding_free=False,
            pad_to_multiple_of=8 if self.device.type == "cuda" else None,
            dataset_kwargs={"skip_prepare_dataset": True},
        )
        tensorboard = TensorBoardCallback()
        tensorboard.logging_dir = str(self.output_dir / RUNS_DIRNAME / tb_run)
        callbacks = [tensorboard]
        if has_eval and cfg.early_stopping_patience > 0:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
        trainer = _sft_trainer_class()(
            model=self.model,
            args=args,
            train_dataset=self.train_split.dataset,
            eval_dataset=self.eval_split.dataset if has_eval else None,
            processing_class=self.tokenizer,
            callbacks=callbacks + self.extra_callbacks,
            peft_config=_lora_config(cfg) if cfg.lora else None,
        )
        trainer.probe = self.probe if has_eval else None
        if cfg.metric_for_best != "loss":
            trainer.knowledge_metric = cfg.metric_for_best
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
        if checkpoint is None and is_main_process():
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
        if not self.options.keep_checkpoints and is_main_process():
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
        best_metric = float(state.best_metric) if state.best_metric is not None else None
        if eval_entries and self.config.metric_for_best != "loss" and self.probe is not None:
            # the trainer compared the selection score; report the chosen epoch's knowledge score and its loss
            best_step = _step_of(state.best_model_checkpoint)
            chosen = next((e for e in eval_entries if e.get("step") == best_step), None)
            eval_loss = float(chosen["eval_loss"]) if chosen else None
            if chosen and f"eval_{self.config.metric_for_best}" in chosen:
                best_metric = float(chosen[f"eval_{self.config.metric_for_best}"])
        curve = _curve(eval_entries)

        self._save_model(trainer)
        meta = self._meta(state, train_losses, eval_loss, best_epoch, stopped_early, checkpoint, runtime_s, output)
        meta["results"].update(metric_for_best=self.config.metric_for_best, best_metric=best_metric, curve=curve)
        meta_path = self.output_dir / FINETUNED_META_FILENAME
        if trainer.is_world_process_zero():
            fsperm.write_private(meta_path, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
            fsperm.write_private(self.output_dir / formats.MODEL_CARD_FILENAME, formats.model_card(meta))
            fsperm.tighten_tree(self.output_dir)
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
            best_metric=best_metric,
            knowledge=curve,
        )

    def _save_model(self, trainer) -> None:
        """Replace the model files in output_dir (runs/ and checkpoints/ stay).

        Written to a side folder first, so a failed save leaves the previous model whole,
        and old files of another base model (a stale tokenizer, shards) never mix in.
        """
        model = trainer.accelerator.unwrap_model(trainer.model)
        if self.config.lora:  # the adapter folded into the weights: the folder loads like any model
            model = model.merge_and_unload()
        model.config.use_cache = True  # training turned it off; generation wants it
        if getattr(model, "generation_config", None) is not None:
            gen = model.generation_config
            if gen.pad_token_id is None:
                gen.pad_token_id = self.tokenizer.pad_token_id
            if gen.eos_token_id is None:
                gen.eos_token_id = self.tokenizer.eos_token_id
        if not trainer.is_world_process_zero():
            return
        staging = self.output_dir / ".saving"
        shutil.rmtree(staging, ignore_errors=True)
        fsperm.private_dir(staging)
        model.save_pretrained(staging)  # safetensors, config.json, generation_config.json
        # A template-less model (DialoGPT) gets one that writes its training format, so
        # apply_chat_template users (vLLM, TGI) prompt it right; the base tokenizer is untouched.
        import copy

        from memchat.prompting import ensure_chat_template

        tokenizer = copy.deepcopy(self.tokenizer)
        ensure_chat_template(tokenizer)
        tokenizer.save_pretrained(staging)
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
            "default_system_prompt_dropped": self.dropped_system_prompt,  # None: the template's own turns as they are
            "mix": {**self.mix, "examples_by_part": self.train_split.summary()["examples_by_part"],
                    "records_by_kind": self.data.kinds("train"), "excluded_by_part": self.data.excluded},
            "dataset": {
                "path": str(self.data.path),
                "sha256": self.data.sha256,
                "created": self.data.created,
                "generator_model": self.data.generator_model,
                "records": self.data.counts,
                "source": self.data.source,
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


def _curve(eval_entries: list[dict]) -> list[dict]:
    """Per evaluation: epoch, step, answer-token loss and the knowledge scores."""
    out = []
    for e in eval_entries:
        row = {"epoch": e.get("epoch"), "step": e.get("step"), "eval_loss": e.get("eval_loss")}
        for key in ("knowledge_f1", "knowledge_contains"):
            if f"eval_{key}" in e:
                row[key] = round(float(e[f"eval_{key}"]), 2)
        out.append(row)
    return out
