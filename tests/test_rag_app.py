"""The RAG app (main.py) with Streamlit's AppTest: empty store, documents, chat, remove, wrong key."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from memchat import config
from memchat.knowledge import KnowledgeBase

REPO = Path(__file__).resolve().parents[1]
QA_PDFS = sorted((REPO.parent / "shared" / "data" / "qa_dev" / "pdfs").glob("*.pdf"))


@pytest.fixture
def app(monkeypatch, tiny_qwen_dir):
    monkeypatch.setenv("MEMCHAT_LLM", str(tiny_qwen_dir))
    return AppTest.from_file(str(REPO / "main.py"), default_timeout=240)


def test_empty_store_says_what_to_do(app):
    app.run()
    assert not app.exception
    assert any("Add PDFs in the sidebar" in i.value for i in app.info)
    assert len(app.chat_input) == 0  # no chat before there is something to ask


def test_documents_listed_chat_answers_with_citations_and_remove(app):
    KnowledgeBase().add_documents(QA_PDFS[2:4])  # real bundled embedder, as the app uses
    app.run()
    assert not app.exception
    sidebar_text = " ".join(m.value for m in app.sidebar.markdown)
    assert QA_PDFS[2].name in sidebar_text and QA_PDFS[3].name in sidebar_text and "v1" in sidebar_text

    app.chat_input[0].set_value("   ").run()  # a blank message asks nothing
    assert not app.exception and len(app.chat_message) == 0
    app.chat_input[0].set_value("Where does the Rhine flow?").run()
    assert not app.exception
    md = " ".join(m.value for m in app.markdown)
    assert "Where does the Rhine flow?" in md
    assert "**Sources:**" in md and f"{QA_PDFS[3].name}, p. 1" in md
    assert any("Evidence:" in c.value for c in app.caption)
    assert any("confidence in this phrase" in c.value for c in app.caption)  # Answer.note: a copied phrase
    assert len(app.chat_message) == 2

    rm = next(b for b in app.sidebar.button if b.key == f"rm-{QA_PDFS[3].name}")
    rm.click().run()
    assert not app.exception
    assert [d["name"] for d in KnowledgeBase().documents()] == [QA_PDFS[2].name]


def test_wrong_key_is_an_error_not_a_crash(app):
    from cryptography.fernet import Fernet

    KnowledgeBase().add_documents(QA_PDFS[:1])
    key = config.storage_dir() / config.KEY_FILENAME
    before = (config.storage_dir() / config.INDEX_FILENAME).read_bytes()
    key.write_bytes(Fernet.generate_key())
    app.run()
    assert not app.exception
    assert any("does not open the store" in e.value for e in app.error)
    assert (config.storage_dir() / config.INDEX_FILENAME).read_bytes() == before


def test_one_rag_pipeline_per_server_model_and_mode(tmp_path):
    """Reruns reuse the pipeline (its sentence vectors and the reader's encoded prompt prefix), per mode."""
    from memchat.ui.common import shared_rag_pipeline

    kb, generator = KnowledgeBase(tmp_path / "store"), object()
    first = shared_rag_pipeline(kb, generator, "m", "extractive")
    assert shared_rag_pipeline(kb, generator, "m", "extractive") is first
    assert first.kb is kb and first.mode == "extractive"
    other = shared_rag_pipeline(kb, generator, "m", "generative")
    assert other is not first and other.mode == "generative"
    assert shared_rag_pipeline(KnowledgeBase(tmp_path / "other"), generator, "m", "extractive") is not first
