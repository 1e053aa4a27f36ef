"""Fine-tuning: data checks, answer-only labels, the Trainer recipe, saving, resume, the script.

Tiny random models (tests/tiny_models.py) train for a few dozen steps in seconds; no
timings here (bench/train.py measures speed).
"""

import hashlib
import json
import logging
import re
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch

from memchat import config
from memchat.errors import DatasetError, MemChatError
from memchat.training import (
    CHECKPOINTS_DIRNAME,
    IGNORE_INDEX,
    MODEL_META_FORMAT,
    MODEL_META_VERSION,
    RUN_STATE_FILENAME,
    AnswerOnlyCollator,
    ConversationalTrainer,
    TrainingOutOfMemoryError,
    build_dataset,
    load_training_data,
    prompt_ids,
    read_model_meta,
    setting_names,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_conversational.py"

# Small enough to memorise in a few dozen steps; words the tiny tokenizers know.
PAIRS = [
    ("What is the capital of France?", "Paris is the capital."),
    ("What is the capital of Germany?", "Berlin is the capital."),
    ("What is the capital of Italy?", "Rome is the capital."),
    ("Which river flows north?", "The river flows north through the valley."),
]
LINEAGE = {"documents": [{"name": "a.pdf", "version": 2, "sha256": "ab" * 32}], "store_generation": "g7"}


@pytest.fixture(autouse=True)
def _one_thread(torch_single_thread):
    """Tiny matrices: one thread is faster on a busy 2-core machine."""


def write_dataset(path=None, pairs=PAIRS, validation=((PAIRS[0][0], PAIRS[0][1]),), **top) -> Path:
    path = Path(path or config.training_dir() / config.DATASET_FILENAME)
    records = [
        {"id": f"r{i}", "question": q, "answer": a, "kind": "original", "source_question_id": f"q{i}",
         "split": "train", "document": "a.pdf", "doc_version": 2, "page_start": 1, "page_end": 1,
         "chunk_id": i, "chunk_hash": f"h{i}"}
        for i, (q, a) in enumerate(pairs)
    ]
    records += [
        {"id": f"v{i}", "question": q, "answer": a, "kind": "original", "split": "validation", "document": "a.pdf"}
        for i, (q, a) in enumerate(validation)
    ]
    doc = {"format": "memchat-training-data", "format_version": 2, "created": "2025-01-01T00:00:00+00:00",
           "generator_model": "tiny", "settings": {}, "lineage": LINEAGE, "records": records, **top}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def tokenizer_of(folder):
    from memchat.models import load_tokenizer

    return load_tokenizer(str(folder))


# ---------------------------------------------------------------------------
# Answer-only labels, exact positions
# ---------------------------------------------------------------------------
def test_dialogpt_format_labels_only_the_answer(tiny_gpt2_dir):
    tok = tokenizer_of(tiny_gpt2_dir)
    eos = tok.eos_token_id
    q, a = "What is the capital of France?", "Paris is the capital."
    split = build_dataset([{"question": f"  {q} ", "answer": a}], tok, max_length=512)
    row = split.dataset[0]
    q_ids = tok(q, add_special_tokens=False)["input_ids"]
    a_ids = tok(a, add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == q_ids + [eos] + a_ids + [eos]  # question<eos>answer<eos>
    assert row["labels"] == [IGNORE_INDEX] * (len(q_ids) + 1) + a_ids + [eos]
    assert row["length"] == len(row["input_ids"])
    assert prompt_ids(tok, q) == q_ids + [eos]  # what inference feeds
    assert split.answer_tokens == len(a_ids) + 1 and split.tokens == len(row["input_ids"])


def test_chat_template_labels_only_the_assistant_content(tiny_qwen_dir):
    tok = tokenizer_of(tiny_qwen_dir)
    q, a = "Which river flows north?", "The river flows north."
    row = build_dataset([{"question": q, "answer": a}], tok, max_length=512).dataset[0]
    ids, labels = row["input_ids"], row["labels"]
    n_masked = labels.index(next(x for x in labels if x != IGNORE_INDEX))
    assert all(x == IGNORE_INDEX for x in labels[:n_masked])
    assert labels[n_masked:] == ids[n_masked:]
    # Masked: the whole prompt, exactly what generation is given; supervised: answer + end of turn.
    assert tok.decode(ids[:n_masked]) == "<|im_start|>user\n" + q + "<|im_end|>\n<|im_start|>assistant\n"
    assert ids[:n_masked] == prompt_ids(tok, q)
    assert tok.decode(ids[n_masked:]) == a + "<|im_end|>"
    # The template's own {% generation %} marks agree position by position.
    mask = tok.apply_chat_template(
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
        tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
    )
    template_ids, assistant = mask["input_ids"], mask["assistant_masks"]
    assert template_ids[: len(ids)] == ids
    assert [i for i, m in enumerate(assistant) if m] == list(range(n_masked, len(ids)))


def test_too_long_examples_are_cut_or_skipped(tiny_gpt2_dir):
    tok = tokenizer_of(tiny_gpt2_dir)
    q, a = "What is the capital of France?", "Paris is the capital and largest city of France."
    n_prompt = len(prompt_ids(tok, q))
    split = build_dataset([{"question": q, "answer": a}, {"question": q * 5, "answer": a}], tok, max_length=n_prompt + 3)
    assert (split.truncated, split.skipped, len(split.dataset)) == (1, 1, 1)
    row = split.dataset[0]
    assert len(row["input_ids"]) == n_prompt + 3 and sum(x != IGNORE_INDEX for x in row["labels"]) == 3


def test_collator_pads_each_batch_to_its_own_longest():
    collate = AnswerOnlyCollator(pad_token_id=0)
    batch = collate([
        {"input_ids": [5, 6, 7, 8], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, 8], "length": 4},
        {"input_ids": [5, 9], "labels": [IGNORE_INDEX, 9], "length": 2},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [5, 9, 0, 0]]  # 4 = longest here, not max_length
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 7, 8], [IGNORE_INDEX, 9, IGNORE_INDEX, IGNORE_INDEX]]
    assert AnswerOnlyCollator(0, pad_to_multiple_of=8)([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}])[
        "input_ids"].shape == (1, 8)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------
BAD_DATA = {
    "missing": (None, r"No training data at .*faiss_training_data\.json\. Make it with: python extract_faiss_data\.py"),
    "empty": ("  \n", r"faiss_training_data\.json is empty\. Make it again"),
    "not json": ("{records: [", r"is not valid JSON \(.* at line 1, column 2\)"),
    "other format": (json.dumps([{"prompt": "q", "response": "a"}]),
                     r'record 1 \(prompt, response\) is none of \{"question", "answer"\}, \{"instruction", "output"\} '
                     r'or \{"messages": \[\.\.\.\]\}'),
    "other version": (json.dumps({"format": "memchat-training-data", "format_version": 9, "records": []}),
                      r"has format version 9; this Mem_Chat reads version 2"),
    "no records": (json.dumps({"format": "memchat-training-data", "format_version": 2, "records": []}),
                   r"holds no records"),
    "record without answer": (json.dumps({"format": "memchat-training-data", "format_version": 2,
                                          "records": [{"id": "r1", "question": "q?", "answer": " "}]}),
                              r"record 1 \(id 'r1'\) has no answer"),
    "only validation": (json.dumps({"format": "memchat-training-data", "format_version": 2,
                                    "records": [{"question": "q?", "answer": "a", "split": "validation"}]}),
                        r"has no training records \(all 1 are validation\)"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_one_clear_line(case):
    text, message = BAD_DATA[case]
    path = config.training_dir() / config.DATASET_FILENAME
    if text is not None:
        path.parent.mkdir(parents=True)
        path.write_text(text)
    with pytest.raises(DatasetError, match=message) as exc:
        load_training_data(path)
    assert "\n" not in str(exc.value)


def test_data_file_is_read_with_its_lineage():
    path = write_dataset()
    data = load_training_data(path.parent)  # the folder works too
    assert data.counts == {"train": 4, "validation": 1, "total": 5}
    assert data.lineage == LINEAGE
    assert data.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_without_validation_nothing_is_probed_and_the_last_epoch_is_kept(tiny_gpt2_dir):
    write_dataset(validation=())
    ct = ConversationalTrainer(model_name=str(tiny_gpt2_dir), early_stopping_patience=2).prepare()
    assert ct.eval_split is None and ct.probe is None
    trainer = ct.build_trainer("r")
    assert trainer.args.eval_strategy.value == "no" and not trainer.args.load_best_model_at_end


# ---------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------
def test_bf16_autocast_on_cpu_is_an_option_fp16_is_not(tiny_qwen_dir, monkeypatch):
    """--precision bf16 on a CPU: float32 weights, bf16 autocast (1.5x the tokens/s of fp32 on a Zen 4,
    bench/train.py); fp16 has no CPU autocast worth having and stays CUDA-only."""
    monkeypatch.setenv("MEMCHAT_DEVICE", "cpu")
    write_dataset()
    ct = ConversationalTrainer(model_name=str(tiny_qwen_dir), precision="bf16")
    args = ct.build_trainer("run1").args
    assert args.bf16 and not args.fp16 and args.use_cpu
    assert ct.model.dtype == torch.float32  # master weights
    with pytest.raises(MemChatError, match="needs a CUDA GPU"):
        ConversationalTrainer(model_name=str(tiny_qwen_dir), precision="fp16").build_trainer("run2")


def test_trainer_setup_follows_the_guide(tiny_qwen_dir):
    from transformers import EarlyStoppingCallback
    from transformers.integrations import TensorBoardCallback
    from transformers.trainer_pt_utils import LengthGroupedSampler

    write_dataset()
    ct = ConversationalTrainer(model_name=str(tiny_qwen_dir), early_stopping_patience=3)
    trainer = ct.build_trainer("run1")
    args = trainer.args
    assert (args.num_train_epochs, args.per_device_train_batch_size, args.gradient_accumulation_steps) == (15, 4, 8)
    assert args.learning_rate == 3e-4 and args.lr_scheduler_type.value == "cosine" and args.warmup_steps == 0.05
    assert args.gradient_checkpointing and not (args.bf16 or args.fp16)  # mixed precision only on CUDA
    assert args.eval_strategy.value == "epoch" and args.save_strategy.value == "epoch"
    # the saved epoch is the one that answers the held-out questions best, not the lowest loss
    # knowledge_f1, ties broken by the loss (memchat.probe.selection_score)
    assert args.load_best_model_at_end and args.metric_for_best_model == "eval_knowledge_selection" and args.greater_is_better
    from trl import SFTTrainer

    assert isinstance(trainer, SFTTrainer) and trainer.probe is ct.probe and ct.probe.questions
    assert isinstance(trainer._get_train_sampler(), LengthGroupedSampler)
    tensorboard = next(c for c in trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback))
    assert Path(tensorboard.logging_dir) == config.finetuned_dir() / "runs" / "run1"
    assert any(isinstance(c, EarlyStoppingCallback) for c in trainer.callback_handler.callbacks)
    assert Path(args.output_dir) == config.finetuned_dir() / CHECKPOINTS_DIRNAME


def _greedy_answer(folder: Path, question: str) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([prompt_ids(tok, question)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_training_learns_saves_and_reloads(tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM

    path = write_dataset()
    before = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).state_dict()
    ct = ConversationalTrainer(
        model_name=str(tiny_gpt2_dir), num_train_epochs=30, gradient_accumulation_steps=1,
        learning_rate=1e-2, warmup_ratio=0.0, logging_steps=1, progress=False,
        metric_for_best="loss", early_stopping_patience=0,
    )
    result = ct.train()

    out = config.finetuned_dir()
    assert result.output_dir == out and result.global_step == 30
    # A loss was logged each step and it fell on this memorisable set.
    losses = [e["loss"] for e in ct.last_log_history if "loss" in e]
    assert len(losses) >= 25 and losses[-1] < 0.25 * losses[0]
    # The saved folder is complete, holds no pickle, and keeps no checkpoints after a finished run.
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            config.FINETUNED_META_FILENAME, "runs", "README.md"} <= names
    card = (out / "README.md").read_text()
    assert "base_model: " + str(tiny_gpt2_dir) in card and "## Privacy" in card and "| epoch |" in card
    assert out.stat().st_mode & 0o777 == 0o700 and (out / "model.safetensors").stat().st_mode & 0o777 == 0o600
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names) and CHECKPOINTS_DIRNAME not in names
    # Parameters changed, the folder reloads, and it answers a trained question.
    after = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert _greedy_answer(out, "What is the capital of Italy?") == "Rome is the capital."
    # ... and through the app's own loader, which must build the very prompt training used.
    from memchat.finetuned import FineTunedChat

    assert FineTunedChat().answer("What is the capital of Italy?") == "Rome is the capital."

    meta = read_model_meta(out)
    assert (meta["format"], meta["format_version"]) == (MODEL_META_FORMAT, MODEL_META_VERSION)
    assert meta["base_model"]["requested"] == str(tiny_gpt2_dir) and meta["base_model"]["notice"] is None
    assert meta["prompt_format"] == "eos_separated"
    assert meta["dataset"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert meta["dataset"]["records"] == {"train": 4, "validation": 1, "total": 5}
    assert meta["lineage"] == LINEAGE
    assert meta["settings"]["num_train_epochs"] == 30 and meta["settings"]["learning_rate"] == 1e-2
    results = meta["results"]
    assert results["train_loss"] == pytest.approx(losses[-1])
    assert results["eval_loss"] is not None and results["eval_loss"] == min(
        e["eval_loss"] for e in ct.last_log_history if "eval_loss" in e)  # the best epoch is what was kept
    assert results["global_step"] == 30 and results["resumed_from_step"] is None

    # TensorBoard: training loss, validation loss and learning rate.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = (out / "runs").iterdir()
    tags = EventAccumulator(str(run)).Reload().Tags()["scalars"]
    assert {"train/loss", "eval/loss", "train/learning_rate", "eval/knowledge_f1", "eval/knowledge_contains"} <= set(tags)


def test_chat_model_learns_through_its_template(tiny_qwen_dir):
    write_dataset(validation=())
    result = ConversationalTrainer(model_name=str(tiny_qwen_dir), num_train_epochs=25, gradient_accumulation_steps=1,
                                   learning_rate=1e-2, warmup_ratio=0.0, progress=False).train()
    meta = read_model_meta(result.output_dir)
    assert meta["prompt_format"] == "chat_template" and meta["results"]["eval_loss"] is None
    from transformers import AutoTokenizer

    from memchat.finetuned import FineTunedChat

    assert AutoTokenizer.from_pretrained(result.output_dir).chat_template  # inference uses the same template
    assert _greedy_answer(result.output_dir, "Which river flows north?") == "The river flows north through the valley."
    assert FineTunedChat().answer("What is the capital of France?") == "Paris is the capital."


class _Interrupted(Exception):
    pass


def test_resume_continues_from_the_checkpoint_step(tiny_gpt2_dir):
    from transformers import TrainerCallback

    class StopAfterSecondSave(TrainerCallback):
        saves = 0

        def on_save(self, args, state, control, **kwargs):
            StopAfterSecondSave.saves += 1
            if StopAfterSecondSave.saves == 2:
                raise _Interrupted()

    class FirstStep(TrainerCallback):
        seen = None

        def on_train_begin(self, args, state, control, **kwargs):
            FirstStep.seen = state.global_step

    write_dataset()
    settings = dict(model_name=str(tiny_gpt2_dir), num_train_epochs=4, gradient_accumulation_steps=1,
                    gradient_checkpointing=False, progress=False)  # 4 examples / batch 4: one step per epoch
    with pytest.raises(_Interrupted):
        ConversationalTrainer(**settings, callbacks=[StopAfterSecondSave()]).train()
    checkpoints = config.finetuned_dir() / CHECKPOINTS_DIRNAME
    assert (checkpoints / "checkpoint-2").is_dir() and (checkpoints / RUN_STATE_FILENAME).is_file()
    assert not (config.finetuned_dir() / "model.safetensors").exists()  # nothing final yet

    result = ConversationalTrainer(**settings, resume=True, callbacks=[FirstStep()]).train()
    assert FirstStep.seen == 2  # picked up at the checkpoint's step, not from zero
    assert result.resumed_from_step == 2 and result.global_step == 4
    assert read_model_meta(result.output_dir)["results"]["resumed_from_step"] == 2
    assert len(list((config.finetuned_dir() / "runs").iterdir())) == 1  # one TensorBoard run, continued


def test_resume_refuses_other_data_or_nothing_to_resume(tiny_gpt2_dir):
    write_dataset()
    with pytest.raises(MemChatError, match="Nothing to resume: no checkpoint in .*Start a new run"):
        ConversationalTrainer(model_name=str(tiny_gpt2_dir), resume=True).train()
    checkpoints = config.finetuned_dir() / CHECKPOINTS_DIRNAME / "checkpoint-3"
    checkpoints.mkdir(parents=True)
    (checkpoints.parent / RUN_STATE_FILENAME).write_text(json.dumps({"dataset_sha256": "0" * 64}))
    with pytest.raises(MemChatError, match="made from other training data .*without --resume"):
        ConversationalTrainer(model_name=str(tiny_gpt2_dir), resume=True).train()


def test_out_of_memory_suggests_the_guides_remedies(tiny_gpt2_dir, monkeypatch):
    import transformers

    def oom(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(transformers.Trainer, "train", oom)
    write_dataset()
    with pytest.raises(TrainingOutOfMemoryError, match="--batch-size 2 --grad-accum 4 --gradient-checkpointing"):
        ConversationalTrainer(model_name=str(tiny_gpt2_dir)).train()


# ---------------------------------------------------------------------------
# The script, run as a user would
# ---------------------------------------------------------------------------
@pytest.fixture
def restore_logging():
    """The script configures logging for a terminal; give the next test the defaults back."""
    import transformers

    logger = logging.getLogger("memchat")
    saved = (logger.handlers[:], logger.level, logger.propagate, transformers.logging.get_verbosity())
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[:3]
    transformers.logging.set_verbosity(saved[3])
    transformers.utils.logging.enable_progress_bar()


def run_script(monkeypatch, capsys, *argv):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *argv])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_every_script_flag_reaches_the_trainer():
    """A flag the parser knows but settings_from does not map would be silently ignored."""
    script = runpy.run_path(str(SCRIPT), run_name="not_main")
    parser = script["build_parser"]()
    dests = {a.dest for a in parser._actions} - {"help", "config", "quiet"}
    assert dests <= set(script["_FLAG_FIELDS"]), dests - set(script["_FLAG_FIELDS"])
    assert set(script["_FLAG_FIELDS"].values()) <= setting_names()
    settings = script["settings_from"](parser.parse_args(["--no-drop-system-prompt", "--epochs", "2"]))
    assert settings == {"drop_default_system_prompt": False, "num_train_epochs": 2}


@pytest.mark.parametrize("case", ["missing", "not json", "record without answer"])
def test_script_bad_data_exit_1_one_line(case, monkeypatch, capsys, restore_logging):
    text, message = BAD_DATA[case]
    if text is not None:
        path = config.training_dir() / config.DATASET_FILENAME
        path.parent.mkdir(parents=True)
        path.write_text(text)
    code, out, err = run_script(monkeypatch, capsys)
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(message, err)


def test_script_out_of_memory_exit_1(tiny_gpt2_dir, monkeypatch, capsys, restore_logging):
    import transformers

    monkeypatch.setattr(transformers.Trainer, "train",
                        lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory")))
    write_dataset()
    code, _, err = run_script(monkeypatch, capsys, "--model", str(tiny_gpt2_dir))
    assert code == 1 and err.count("\n") == 1
    assert "Out of GPU memory" in err and "--batch-size 2 --grad-accum 4 --gradient-checkpointing" in err


def test_script_offline_fallback_notice_and_flags(tiny_qwen_dir, monkeypatch, capsys, restore_logging):
    """microsoft/DialoGPT-small offline -> the bundled model (here: the tiny Qwen in its place), one notice."""
    from memchat import models

    monkeypatch.setattr(models, "_notices_logged", set())
    monkeypatch.setattr(models, "_bundled", lambda requested, kind, notice=None: models.ResolvedModel(
        requested, str(tiny_qwen_dir), "bundled", notice=notice, kind=kind))
    monkeypatch.setenv("HF_HUB_CACHE", str(config.home() / "empty-hub-cache"))
    (config.home() / "settings.json").write_text(json.dumps({"num_train_epochs": 3, "learning_rate": 1e-3}))
    write_dataset()
    code, out, err = run_script(monkeypatch, capsys, "--config", "settings.json", "--epochs", "1",
                                "--grad-accum", "1", "--quiet")
    assert code == 0, err
    notices = [line for line in out.splitlines() if "not available offline" in line]
    assert notices == ["Note: Model 'microsoft/DialoGPT-small' is not available offline; "
                       "using SmolLM2-135M-Instruct (bundled)."]
    assert "settings:" in out and "done: " in out and "curves: tensorboard --logdir" in out
    meta = read_model_meta(config.finetuned_dir())
    assert meta["base_model"]["requested"] == "microsoft/DialoGPT-small"
    assert meta["base_model"]["resolved"] == config.BUNDLED_LLM_NAME and meta["base_model"]["notice"]
    # defaults < --config < flags
    assert meta["settings"]["num_train_epochs"] == 1 and meta["settings"]["learning_rate"] == 1e-3
    assert meta["settings"]["gradient_accumulation_steps"] == 1 and meta["settings"]["progress"] is False


# ---------------------------------------------------------------------------
# The training mix, TRL, the knowledge probe, LoRA, user data, scale-out
# ---------------------------------------------------------------------------
def test_each_mix_part_is_labelled_exactly(tiny_gpt2_dir):
    tok = tokenizer_of(tiny_gpt2_dir)
    eos = tok.eos_token_id
    text = "The river flows north through the valley."
    recs = [
        {"kind": "document", "text": text},
        {"kind": "cloze", "question": "Fill in the blank: The river flows ___ through the valley.", "answer": "north"},
        {"kind": "variation", "question": "Which way does the river go?", "answer": "North."},
    ]
    split = build_dataset(recs, tok, max_length=512)
    rows = split.dataset
    doc_ids = tok(text, add_special_tokens=False)["input_ids"] + [eos]
    assert rows[0]["input_ids"] == doc_ids and rows[0]["labels"] == doc_ids  # (a): loss on every token
    for row, r in zip(list(rows)[1:], recs[1:]):  # (b)-(d): loss on the answer (+ eos) only
        q_ids = tok(r["question"], add_special_tokens=False)["input_ids"] + [eos]
        a_ids = tok(r["answer"], add_special_tokens=False)["input_ids"] + [eos]
        assert row["input_ids"] == q_ids + a_ids
        assert row["labels"] == [IGNORE_INDEX] * len(q_ids) + a_ids
    assert split.by_part == {"documents": 1, "restatements": 1, "paraphrases": 1}
    # a document longer than max_length becomes windows, each fully labelled
    long = build_dataset([{"kind": "document", "text": " ".join([text] * 6)}], tok, max_length=16).dataset
    assert len(long) > 1 and all(len(r["input_ids"]) <= 16 and r["labels"] == r["input_ids"] for r in long)


def test_mix_switches_select_the_training_records(tiny_gpt2_dir):
    path = write_dataset()
    doc = json.loads(path.read_text())
    doc["records"] += [
        {"id": "d1", "kind": "document", "text": "Paris is the capital of France.", "split": "train"},
        {"id": "s1", "kind": "wh", "question": "What is the capital of France?", "answer": "Paris", "split": "train"},
        {"id": "p1", "kind": "variation", "question": "France's capital?", "answer": "Paris.", "split": "train"},
    ]
    path.write_text(json.dumps(doc))
    ct = ConversationalTrainer(model_name=str(tiny_gpt2_dir), mix_documents=False, mix_paraphrases=False).prepare()
    assert ct.data.kinds() == {"original": 4, "wh": 1} and ct.data.excluded == {"documents": 1, "paraphrases": 1}
    with pytest.raises(DatasetError, match="leaves no training record"):
        ConversationalTrainer(model_name=str(tiny_gpt2_dir), mix_documents=False, mix_paraphrases=False,
                              mix_qa=False, mix_restatements=False).prepare()


def test_trl_prompt_completion_gives_the_same_ids_and_labels(tiny_qwen_dir):
    """TRL's own conversational prompt/completion tokenization with completion_only_loss == ours,
    but for the newline after <|im_end|>, which we leave out (memchat.prompting)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    tok = tokenizer_of(tiny_qwen_dir)
    ours = build_dataset([{"question": q, "answer": a} for q, a in PAIRS], tok, max_length=512).dataset
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
                            for q, a in PAIRS])
    args = SFTConfig(output_dir=str(config.home() / "trl"), completion_only_loss=True, report_to="none", use_cpu=True,
                     max_length=512)
    trl_ds = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_qwen_dir), args=args, train_dataset=ds,
                        processing_class=tok).train_dataset
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    for mine, theirs in zip(ours, trl_ds):
        assert theirs["input_ids"] == mine["input_ids"] + newline
        assert theirs["labels"] == mine["labels"] + newline


def test_template_less_model_is_saved_with_a_template_that_reproduces_training(tiny_gpt2_dir):
    from transformers import AutoTokenizer

    write_dataset(validation=())
    ConversationalTrainer(model_name=str(tiny_gpt2_dir), num_train_epochs=1, progress=False).train()
    saved = AutoTokenizer.from_pretrained(config.finetuned_dir())
    base = tokenizer_of(tiny_gpt2_dir)
    assert not base.chat_template and saved.chat_template
    q = "What is the capital of France?"
    ids = saved.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                    return_dict=True)["input_ids"]
    assert list(ids) == prompt_ids(base, q)  # what vLLM/TGI send is what training taught


# SmolLM2's template, shaped: a default system turn when the messages bring none.
DEFAULT_SYSTEM = "You are a helpful AI assistant named Tiny, trained by nobody"
DEFAULT_SYSTEM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture
def default_system_qwen_dir(tiny_qwen_dir, tmp_path):
    """The tiny Qwen with a template that writes a default system prompt (as SmolLM2's and Qwen2.5's do)."""
    folder = tmp_path / "tiny_qwen_default_system"
    shutil.copytree(tiny_qwen_dir, folder)
    tok = tokenizer_of(folder)
    tok.chat_template = DEFAULT_SYSTEM_TEMPLATE
    tok.save_pretrained(folder)
    return folder


def test_default_system_prompt_is_read_off_the_template_and_emptied(default_system_qwen_dir, tiny_qwen_dir):
    from memchat.prompting import default_system_prompt, drop_default_system_prompt

    tok = tokenizer_of(default_system_qwen_dir)
    assert default_system_prompt(tok) == DEFAULT_SYSTEM
    assert DEFAULT_SYSTEM in tok.decode(prompt_ids(tok, "Who?"))
    assert drop_default_system_prompt(tok) == DEFAULT_SYSTEM
    assert tok.decode(prompt_ids(tok, "Who?")) == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nWho?<|im_end|>\n<|im_start|>assistant\n"
    assert default_system_prompt(tok) is None and drop_default_system_prompt(tok) is None  # once is enough
    plain = tokenizer_of(tiny_qwen_dir)  # no default system turn: nothing to drop, the template untouched
    template = plain.chat_template
    assert default_system_prompt(plain) is None and drop_default_system_prompt(plain) is None
    assert plain.chat_template == template


@pytest.mark.parametrize("drop", [True, False])
def test_training_and_the_saved_template_share_the_emptied_system_prompt(default_system_qwen_dir, drop):
    from transformers import AutoTokenizer

    write_dataset(validation=())
    trainer = ConversationalTrainer(model_name=str(default_system_qwen_dir), num_train_epochs=1, progress=False,
                                    drop_default_system_prompt=drop)
    result = trainer.train()
    trained_on = trainer.tokenizer.decode(trainer.train_split.dataset[0]["input_ids"])
    saved = AutoTokenizer.from_pretrained(result.output_dir)
    q = PAIRS[0][0]
    ids = saved.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                    return_dict=True)["input_ids"]
    assert list(ids) == prompt_ids(trainer.tokenizer, q)  # what vLLM/TGI send is what training taught
    meta = read_model_meta(result.output_dir)
    if drop:
        assert DEFAULT_SYSTEM not in trained_on and "<|im_start|>system\n<|im_end|>" in trained_on
        assert DEFAULT_SYSTEM not in saved.decode(ids)
        assert meta["default_system_prompt_dropped"] == DEFAULT_SYSTEM
    else:
        assert DEFAULT_SYSTEM in trained_on and DEFAULT_SYSTEM in saved.decode(ids)
        assert meta["default_system_prompt_dropped"] is None


def test_knowledge_metric_logs_and_selects_the_checkpoint(tiny_gpt2_dir, monkeypatch):
    """Loss falls every epoch, the (scripted) knowledge score peaks at epoch 2: epoch 2 is kept."""
    from memchat import probe as probe_mod

    scores = iter([10.0, 60.0, 20.0, 15.0])
    real_score = probe_mod.KnowledgeProbe.score
    seen_predictions = []

    def scripted(self, predictions):
        seen_predictions.append(list(predictions))  # the real greedy answers, one per question
        real = real_score(self, predictions)
        return {**real, "knowledge_f1": next(scores)}

    monkeypatch.setattr(probe_mod.KnowledgeProbe, "score", scripted)
    write_dataset(validation=PAIRS[:2])
    settings = dict(model_name=str(tiny_gpt2_dir), num_train_epochs=4, gradient_accumulation_steps=1,
                    per_device_train_batch_size=4, learning_rate=1e-2, warmup_ratio=0.0, progress=False,
                    gradient_checkpointing=False, early_stopping_patience=0)
    ct = ConversationalTrainer(**settings, keep_checkpoints=True, save_total_limit=10)
    result = ct.train()
    losses = [row["eval_loss"] for row in result.knowledge]
    assert losses == sorted(losses, reverse=True)  # the loss alone would keep epoch 4
    assert [row["knowledge_f1"] for row in result.knowledge] == [10.0, 60.0, 20.0, 15.0]
    assert result.best_epoch == 2 and result.best_metric == 60.0
    assert len(seen_predictions) == 4 and all(len(p) == 2 for p in seen_predictions)
    meta = read_model_meta(config.finetuned_dir())
    assert meta["results"]["best_epoch"] == 2 and meta["results"]["metric_for_best"] == "knowledge_f1"
    assert [row["knowledge_f1"] for row in meta["results"]["curve"]] == [10.0, 60.0, 20.0, 15.0]
    assert meta["results"]["eval_loss"] == pytest.approx(losses[1])  # the saved weights' own loss
    # the saved weights are epoch 2's checkpoint (one optimizer step per epoch here)
    from safetensors.torch import load_file

    kept = load_file(config.finetuned_dir() / "model.safetensors")
    two = load_file(config.finetuned_dir() / CHECKPOINTS_DIRNAME / "checkpoint-2" / "model.safetensors")
    last = load_file(config.finetuned_dir() / CHECKPOINTS_DIRNAME / "checkpoint-4" / "model.safetensors")
    assert all(torch.equal(kept[k], two[k]) for k in kept if k in two)
    assert any(not torch.equal(kept[k], last[k]) for k in kept if k in last)
    # with --metric-for-best loss, the last (lowest-loss) epoch is kept
    scores = iter([10.0, 60.0, 20.0, 15.0])
    by_loss = ConversationalTrainer(**{**settings, "metric_for_best": "loss", "output_dir": config.home() / "l"}).train()
    assert by_loss.best_epoch == 4


def test_the_probe_asks_one_question_per_family_and_the_span_probes_in_turn():
    from memchat.probe import KnowledgeProbe

    records = [
        {"question": "Who founded the lab?", "answer": "Maxwell founded the Cavendish Laboratory in 1874.", "kind": "original"},
        {"question": "According to the document, who founded the lab?", "answer": "...", "kind": "variation"},
        {"question": "Maxwell founded the what?", "answer": "Cavendish Laboratory", "kind": "wh"},
        {"question": "When was the lab founded?", "answer": "It was founded in 1874.", "kind": "original"},
        {"question": "Maxwell founded the lab in what?", "answer": "1874", "kind": "wh"},
        {"question": "The river is how long?", "answer": "1,230 km", "kind": "wh"},
    ]
    probe = KnowledgeProbe.from_records(records)
    assert [q.question for q in probe.questions] == [
        "Who founded the lab?", "Maxwell founded the what?", "When was the lab founded?",
        "Maxwell founded the lab in what?", "The river is how long?"]
    # a family's golds: its sentence and the names/dates the question lacks; a span probe's: its span
    golds = probe.questions[0].golds
    assert golds[0] == "Maxwell founded the Cavendish Laboratory in 1874." and {"Cavendish Laboratory", "1874"} <= set(golds)
    assert probe.questions[1].golds == ["Cavendish Laboratory"]
    assert [q.question for q in KnowledgeProbe.from_records(records, limit=2).questions] == [
        "Who founded the lab?", "Maxwell founded the what?"]


def test_a_knowledge_tie_goes_to_the_epoch_with_the_lower_loss(tiny_gpt2_dir, monkeypatch):
    """Epochs 2 and 4 answer the probe equally well (60); the loss falls every epoch, so epoch 4 is kept,
    and the reported best metric is the knowledge score itself."""
    from memchat import probe as probe_mod

    scores = iter([10.0, 60.0, 20.0, 60.0])
    real_score = probe_mod.KnowledgeProbe.score
    monkeypatch.setattr(probe_mod.KnowledgeProbe, "score",
                        lambda self, predictions: {**real_score(self, predictions), "knowledge_f1": next(scores)})
    write_dataset(validation=PAIRS[:2])
    result = ConversationalTrainer(model_name=str(tiny_gpt2_dir), num_train_epochs=4, gradient_accumulation_steps=1,
                                   per_device_train_batch_size=4, learning_rate=1e-2, warmup_ratio=0.0, progress=False,
                                   gradient_checkpointing=False, early_stopping_patience=0).train()
    losses = [row["eval_loss"] for row in result.knowledge]
    assert losses[3] < losses[1]
    assert result.best_epoch == 4 and result.best_metric == 60.0
    assert read_model_meta(config.finetuned_dir())["results"]["best_metric"] == 60.0


def test_lora_trains_merges_and_reloads(tiny_qwen_dir):
    from transformers import AutoModelForCausalLM

    write_dataset(validation=())
    before = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir).state_dict()
    result = ConversationalTrainer(model_name=str(tiny_qwen_dir), lora=True, lora_r=4, lora_alpha=8,
                                   lora_target_modules="q_proj,v_proj", num_train_epochs=20,
                                   gradient_accumulation_steps=1, learning_rate=5e-2, warmup_ratio=0.0,
                                   progress=False).train()
    out = result.output_dir
    assert not (out / "adapter_config.json").exists()  # merged: the folder is a plain model
    after = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)  # only the adapted layers moved
    assert read_model_meta(out)["settings"]["lora"] is True
    # it learned: the answer-token loss of the training pairs fell, through the reloaded folder
    tok = tokenizer_of(tiny_qwen_dir)
    batch = AnswerOnlyCollator(tok.pad_token_id)(list(build_dataset([{"question": q, "answer": a} for q, a in PAIRS],
                                                                     tok, 512).dataset))

    def loss_of(model):
        with torch.no_grad():
            return float(model(**batch).loss)

    base = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir)
    assert loss_of(AutoModelForCausalLM.from_pretrained(out)) < 0.8 * loss_of(base)
    from memchat.finetuned import FineTunedChat

    assert FineTunedChat(out).answer("What is the capital of France?")  # loads for chat (and so the hybrid)


USER_FORMS = {
    "question_answer.json": json.dumps([{"question": q, "answer": a} for q, a in PAIRS]),
    "instruction_output.jsonl": "\n".join(json.dumps({"instruction": q, "output": a}) for q, a in PAIRS),
    "messages.jsonl": "\n".join(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                                         {"role": "user", "content": q},
                                                         {"role": "assistant", "content": a}]}) for q, a in PAIRS),
}


@pytest.mark.parametrize("name", list(USER_FORMS))
def test_user_datasets_in_three_forms_load(name, tiny_gpt2_dir):
    path = config.home() / name
    path.write_text(USER_FORMS[name])
    data = load_training_data(path)
    assert data.source == "user" and not data.validation
    assert [(r["question"], r["answer"]) for r in data.train] == list(PAIRS)
    ct = ConversationalTrainer(model_name=str(tiny_gpt2_dir), dataset_path=path).prepare()
    assert len(ct.train_split.dataset) == len(PAIRS) and ct.probe is None


def test_user_dataset_of_another_shape_is_one_line(monkeypatch, capsys, restore_logging):
    path = config.home() / "mine.jsonl"
    path.write_text(json.dumps({"q": "What?", "a": "That."}) + "\n")
    code, _, err = run_script(monkeypatch, capsys, "--dataset", str(path))
    assert code == 1 and err.count("\n") == 1
    assert 'record 1 (a, q) is none of {"question", "answer"}, {"instruction", "output"} or {"messages": [...]}' in err


def test_two_process_accelerate_launch_on_cpu(tiny_gpt2_dir):
    """The scale-out path: accelerate launch, 2 CPU processes (gloo), one saved model.

    ``accelerate launch --cpu --num_processes 2`` starts ONE process unless mpirun is set up
    (accelerate's simple launcher); the torchrun launcher (``--multi_gpu``) with no visible GPU
    runs two CPU processes on gloo, which is what this checks."""
    import os
    import subprocess

    write_dataset()
    accelerate = Path(sys.executable).with_name("accelerate")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MASTER_ADDR="127.0.0.1", CUDA_VISIBLE_DEVICES="")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", "29517", str(SCRIPT), "--model", str(tiny_gpt2_dir),
           "--epochs", "2", "--batch-size", "1", "--grad-accum", "1", "--quiet", "--no-gradient-checkpointing"]
    proc = subprocess.run(cmd, env=env, cwd=config.home(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    meta = read_model_meta(config.finetuned_dir())
    # 4 examples over 2 processes at batch 1: 2 steps per epoch (not 4), so both processes trained
    assert meta["results"]["global_step"] == 4
    assert (config.finetuned_dir() / "model.safetensors").is_file()
    assert proc.stdout.count("done: ") == 1  # one process reports
