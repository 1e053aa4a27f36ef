"""The fine-tuned chat: the model class, staleness, the CLI run as a user runs it, and its Streamlit app.

The "fine-tuned" model is the tiny random GPT-2 (DialoGPT-shaped: no chat template)
copied into finetuned_model/ with a metadata file, so the real loading and
generation code runs in well under a second per test.
"""

from __future__ import annotations

import io
import json
import runpy
import shutil
import sys
from pathlib import Path

import pytest

from memchat import config
from memchat.errors import MemChatError, ModelUnavailableError
from memchat.finetuned import FineTunedChat, staleness_warning
from memchat.knowledge import KnowledgeBase
from memchat.formats import MODEL_META_FORMAT, MODEL_META_VERSION
from tests.fakes import FakeEmbedder

REPO = Path(__file__).resolve().parents[1]
QA_PDFS = sorted((REPO.parent / "shared" / "data" / "qa_dev" / "pdfs").glob("*.pdf"))
SCRIPT = REPO / "test_finetuned_model.py"


# ---------------------------------------------------------------------------
# Helpers shared with test_hybrid_app.py and test_evaluate.py
# ---------------------------------------------------------------------------
def make_finetuned(source: Path, target: Path | None = None, documents: list[dict] | None = None,
                   base: str | None = None) -> Path:
    """Copy a tiny model into finetuned_model/ with a memchat_model_meta.json, as training writes it."""
    target = target or config.finetuned_dir()
    shutil.copytree(source, target)
    meta = {
        "format": MODEL_META_FORMAT,
        "format_version": MODEL_META_VERSION,
        "created": "2025-01-02T03:04:05+00:00",
        "base_model": {"requested": base or str(source), "resolved": base or str(source),
                       "display_name": "tiny-gpt2", "source": "local", "notice": None},
        "dataset": {"records": {"train": 12, "validation": 2, "total": 14}},
        "lineage": {"documents": documents or []},
        "results": {"train_loss": 1.5, "eval_loss": 1.75},
    }
    (target / config.FINETUNED_META_FILENAME).write_text(json.dumps(meta))
    return target


def lineage_of(kb: KnowledgeBase) -> list[dict]:
    return [{"name": d["name"], "version": d["version"], "sha256": d["sha256"]} for d in kb.documents()]


def fake_embedder(monkeypatch) -> None:
    """Every Embedder the code builds (the CLI's, the apps') is the deterministic fake."""
    import memchat.embeddings

    monkeypatch.setattr(memchat.embeddings, "Embedder", lambda model_name="m", **kw: FakeEmbedder(model_name))


def make_kb(pdfs=QA_PDFS[:2]) -> KnowledgeBase:
    kb = KnowledgeBase(embedder=FakeEmbedder())
    kb.add_documents(pdfs)
    return kb


def run_script(monkeypatch, capsys, *argv: str, stdin: str | None = None) -> tuple[int, str, str]:
    """Run test_finetuned_model.py as `python test_finetuned_model.py ARGV...` would."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *argv])
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.fixture
def finetuned(tiny_gpt2_dir) -> Path:
    return make_finetuned(tiny_gpt2_dir)


# ---------------------------------------------------------------------------
# The model class
# ---------------------------------------------------------------------------
def test_missing_model_says_how_to_make_one(tmp_path):
    with pytest.raises(ModelUnavailableError, match="No fine-tuned model in .*train_conversational.py"):
        FineTunedChat()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailableError, match="holds no model"):
        FineTunedChat(tmp_path / "empty")


def test_meta_of_another_version_is_an_error(finetuned):
    meta_path = finetuned / config.FINETUNED_META_FILENAME
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(MemChatError, match="version 99"):
        FineTunedChat()


def test_generate_response_as_in_the_guide(finetuned):
    chat = FineTunedChat()  # default folder: finetuned_model/
    assert chat.base_model and chat.meta["results"]["eval_loss"] == 1.75
    text = chat.generate_response("What is the capital of France?")  # the guide's defaults: sampling at 0.7
    assert isinstance(text, str)
    # max_length counts prompt + answer tokens, as transformers' generate does
    gen = chat.generator
    prompt_tokens = len(gen.encode(gen.format_prompt(chat.messages("What is the capital of France?"))))
    gen.stats.reset()
    chat.generate_response("What is the capital of France?", max_length=prompt_tokens + 3, do_sample=False)
    assert 1 <= gen.stats.new_tokens <= 3
    # DialoGPT format: question<eos>, the exact prompt training used
    assert gen.format_prompt(chat.messages(" Hi ")) == "Hi" + gen.tokenizer.eos_token


def test_stream_joins_to_the_greedy_answer(finetuned):
    chat = FineTunedChat()
    q = "Which river flows north?"
    pieces = list(chat.stream(q, max_length=60, do_sample=False))
    assert "".join(pieces) == chat.generate_response(q, max_length=60, do_sample=False)
    assert chat.answer_many([q, q], max_new_tokens=5) == [chat.answer(q, max_new_tokens=5)] * 2


def test_option_loglikelihoods(finetuned):
    chat = FineTunedChat()
    scores = chat.loglikelihoods("Capital of France?", ["Paris", "Berlin and Rome and Madrid"])
    assert len(scores) == 2 and all(s < 0 for s in scores)


# ---------------------------------------------------------------------------
# Staleness: the model against the knowledge base
# ---------------------------------------------------------------------------
def test_staleness_rules():
    old = [{"name": "a.pdf", "version": 1, "sha256": "1"}, {"name": "b.pdf", "version": 2, "sha256": "2"}]
    assert staleness_warning(old, [{"name": "a.pdf", "version": 1, "sha256": "1"}]) is None  # removed only
    assert staleness_warning(None, [{"name": "a.pdf", "version": 1, "sha256": "1"}]) is None  # no lineage known
    w = staleness_warning(old, [{"name": "a.pdf", "version": 2, "sha256": "9"}, {"name": "c.pdf", "version": 1, "sha256": "3"}])
    assert "added since: c.pdf" in w and "a.pdf (now v2, trained on v1)" in w
    assert "removed since (the model still knows them): b.pdf" in w and "python train_conversational.py" in w
    w = staleness_warning(old, [{"name": "a.pdf", "version": 1, "sha256": "other"}])
    assert "a.pdf (content changed)" in w


def test_staleness_against_the_store(tiny_gpt2_dir):
    kb = make_kb(QA_PDFS[:1])
    make_finetuned(tiny_gpt2_dir, documents=lineage_of(kb))
    chat = FineTunedChat(load=False)
    assert chat.staleness() is None
    kb.add_documents(QA_PDFS[1:2])
    assert QA_PDFS[1].name in chat.staleness()


# ---------------------------------------------------------------------------
# The command line, run as a user runs it
# ---------------------------------------------------------------------------
def test_cli_without_model_is_one_line_and_exit_1(monkeypatch, capsys):
    code, out, err = run_script(monkeypatch, capsys, "--question", "hi")
    assert code == 1 and out == ""
    assert err.strip().count("\n") == 0 and err.startswith("error: No fine-tuned model in")
    assert "python train_conversational.py" in err


def test_cli_question_streams_one_answer(finetuned, monkeypatch, capsys):
    kb = make_kb(QA_PDFS[:1])  # a document the model never saw: the warning must show
    code, out, err = run_script(monkeypatch, capsys, "--question", "What is geology?", "--max-length", "40", "--greedy")
    assert code == 0
    chat = FineTunedChat()
    assert out.strip() == chat.generate_response("What is geology?", max_length=40, do_sample=False).strip()
    assert "Loaded fine-tuned tiny-gpt2" in err
    assert f"Warning: The fine-tuned model is older than the knowledge base (added since: {QA_PDFS[0].name}" in err
    assert kb.documents()


def test_cli_interactive_chat(finetuned, monkeypatch, capsys):
    code, out, err = run_script(monkeypatch, capsys, "--model-dir", str(finetuned), "--max-length", "30",
                                stdin="Hello there\nWhat is a prime?\nquit\n")
    assert code == 0
    assert out.count("Model: ") == 2 and "Ask a question" in err


# ---------------------------------------------------------------------------
# The Streamlit chat: streamlit run test_finetuned_model.py streamlit
# ---------------------------------------------------------------------------
def _app():
    from streamlit.testing.v1 import AppTest

    return AppTest.from_file(str(SCRIPT), default_timeout=60)


def test_app_without_model_says_how_to_make_one():
    at = _app().run()
    assert not at.exception
    assert "No fine-tuned model in" in at.info[0].value and "train_conversational.py" in at.info[0].value
    assert not at.chat_input


def test_app_chat_streams_with_time_and_staleness(tiny_gpt2_dir):
    kb = make_kb(QA_PDFS[:2])
    make_finetuned(tiny_gpt2_dir, documents=lineage_of(kb)[:1])
    at = _app().run()
    assert not at.exception
    assert QA_PDFS[1].name in at.warning[0].value  # a document added after training
    assert "tiny-gpt2" in at.sidebar.caption[0].value and "validation loss 1.750" in at.sidebar.caption[0].value
    at.sidebar.slider(key="ft_max_length").set_value(64)
    at.chat_input[0].set_value("What is an igneous rock?").run()
    assert not at.exception
    assert at.chat_message[0].markdown[0].value == "What is an igneous rock?"
    assert at.chat_message[1].caption[0].value.startswith("⏱ ")
    at.chat_input[0].set_value("And sedimentary?").run()  # history is kept
    assert len(at.chat_message) == 4
