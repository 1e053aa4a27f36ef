"""The hybrid app (streamlit run main_hybrid.py) with AppTest, and the hybrid pipeline under it.

Tiny random models (answers are gibberish): these tests check the flow (modes,
what is disabled and why, citations where retrieval was used, timings), not the
answers' quality, which ``--eval`` measures.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from memchat.hybrid import HybridPipeline, fuse
from memchat.knowledge import Hit
from memchat.rag import RAGPipeline
from tests.test_finetuned import QA_PDFS, fake_embedder, lineage_of, make_finetuned, make_kb

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def tiny_llm(monkeypatch, tiny_qwen_dir):
    monkeypatch.setenv("MEMCHAT_LLM", str(tiny_qwen_dir))
    fake_embedder(monkeypatch)


def _app():
    from streamlit.testing.v1 import AppTest

    return AppTest.from_file(str(REPO / "main_hybrid.py"), default_timeout=90)


def _ask(at, mode: str, question: str):
    at.sidebar.radio(key="mode").set_value(mode).run()
    assert not at.exception
    if mode in ("Fine-tuned", "Compare"):  # the random model rarely stops early: keep its answers short
        at.sidebar.slider(key="ft_max_length").set_value(64)
    at.chat_input[0].set_value(question).run()
    assert not at.exception
    return at.chat_message[-1]


# ---------------------------------------------------------------------------
# Availability: what is disabled, and the reason
# ---------------------------------------------------------------------------
def test_nothing_yet_says_both_fixes():
    at = _app().run()
    assert not at.exception
    text = at.info[0].value
    assert "Nothing to chat with yet" in text and "python main.py" in text and "train_conversational.py" in text
    assert not at.chat_input


def test_no_model_disables_its_modes_rag_answers_with_citations():
    make_kb()
    at = _app().run()
    assert not at.exception
    assert at.sidebar.radio(key="mode").value == "RAG"
    assert any("Fine-tuned unavailable" in c.value and "train_conversational.py" in c.value for c in at.sidebar.caption)
    for mode in ("Fine-tuned", "Hybrid", "Compare"):
        at.sidebar.radio(key="mode").set_value(mode).run()
        assert f"{mode} mode is unavailable" in at.info[0].value and "No fine-tuned model" in at.info[0].value
        assert not at.chat_input
    msg = _ask(at, "RAG", "What are the three major types of rock?")
    sources = [m.value for m in msg.markdown if m.value.startswith("**Sources:**")]
    assert sources and ".pdf, p. " in sources[0]
    assert msg.caption[-1].value.startswith("⏱ ")


def test_no_store_disables_rag_and_hybrid(tiny_gpt2_dir):
    make_finetuned(tiny_gpt2_dir)
    at = _app().run()
    assert not at.exception
    assert at.sidebar.radio(key="mode").value == "Fine-tuned"
    for mode in ("RAG", "Hybrid", "Compare"):
        at.sidebar.radio(key="mode").set_value(mode).run()
        assert f"{mode} mode is unavailable" in at.info[0].value and "python main.py" in at.info[0].value
    msg = _ask(at, "Fine-tuned", "What is a prime number?")
    captions = [c.value for c in msg.caption]
    assert "No retrieval: no citations." in captions and captions[-1].startswith("⏱ ")


# ---------------------------------------------------------------------------
# Both present: hybrid and compare
# ---------------------------------------------------------------------------
def test_hybrid_and_compare_modes(tiny_gpt2_dir):
    kb = make_kb()
    make_finetuned(tiny_gpt2_dir, documents=lineage_of(kb))
    at = _app().run()
    assert not at.exception and not at.warning  # up to date: no staleness warning
    msg = _ask(at, "Hybrid", "When the three types of rock are re-melted what is formed?")
    assert any(m.value.startswith("**Sources:**") for m in msg.markdown)
    assert any(e.label.startswith("Fine-tuned draft") for e in msg.expander)
    assert msg.caption[-1].value.startswith("⏱ ") and "answer: " in msg.caption[-1].value

    msg = _ask(at, "Compare", "Which parts of the Earth are included in the lithosphere?")
    cols = msg.columns
    assert len(cols) == 3
    assert [c.markdown[0].value for c in cols] == ["**RAG**", "**Fine-tuned**", "**Hybrid**"]
    assert any(m.value.startswith("**Sources:**") for m in cols[0].markdown)
    assert not any(m.value.startswith("**Sources:**") for m in cols[1].markdown)
    assert any(m.value.startswith("**Sources:**") for m in cols[2].markdown)
    assert all(c.caption[-1].value.startswith("⏱ ") for c in cols)
    # the history re-renders both answers after another rerun
    at.run()
    assert not at.exception and len(at.chat_message) == 4


def test_stale_model_warns(tiny_gpt2_dir):
    kb = make_kb(QA_PDFS[:1])
    make_finetuned(tiny_gpt2_dir, documents=lineage_of(kb))
    kb.add_documents(QA_PDFS[1:2])
    at = _app().run()
    assert not at.exception
    assert any("older than the knowledge base" in w.value and QA_PDFS[1].name in w.value for w in at.warning)


# ---------------------------------------------------------------------------
# The pipeline under the app
# ---------------------------------------------------------------------------
def _hit(cid: int, score: float, doc: str = "a.pdf") -> Hit:
    return Hit(score, cid, doc, 1, 1, 1, f"text {cid}")


def test_fusion_keeps_what_the_question_found():
    plain = [_hit(1, 0.9), _hit(2, 0.8), _hit(3, 0.7)]
    expanded = [_hit(4, 0.95), _hit(1, 0.85), _hit(5, 0.6)]
    fused = fuse([plain, expanded], 3)
    # 1: 1/61 + 1/62; 4: 1/61; 2: 1/62 -> 1, 4, 2
    assert [h.chunk_id for h in fused] == [1, 4, 2]
    assert fused[0].score == 0.9  # the best cosine of the two searches


@pytest.mark.parametrize("strategy", ["expand", "verify", "route"])
def test_strategies_answer_and_stream(strategy, tiny_gpt2_dir, tiny_qwen_dir):
    from memchat.config import GenerationConfig
    from memchat.finetuned import FineTunedChat
    from memchat.generation import Generator

    kb = make_kb()
    make_finetuned(tiny_gpt2_dir)
    rag = RAGPipeline(kb, Generator(str(tiny_qwen_dir)), generation=GenerationConfig(max_new_tokens=8))
    hybrid = HybridPipeline(rag, FineTunedChat(), strategy=strategy, draft_max_new_tokens=8,
                            route_threshold=-1.0 if strategy != "route" else 2.0)  # route: always the fine-tuned model
    answers = hybrid.answer_many(["What is formed when rock re-melts?", "What is a prime number?"], batch_size=2)
    assert len(answers) == 2 and all(a.seconds > 0 for a in answers)
    if strategy == "route":
        assert {a.route for a in answers} == {"finetuned"} and not answers[0].hits
    else:
        assert all(a.hits and a.draft is not None and a.route in ("grounded", "draft") for a in answers)
    pieces, answer = hybrid.stream("What is formed when rock re-melts?")
    assert "".join(pieces).strip() == answer.text and answer.route
    gen, messages = hybrid.scorer("What is a prime number?")
    assert messages and gen is (hybrid.chat.generator if strategy == "route" else rag.generator)


def test_every_route_the_hybrid_reports_has_a_caption():
    from memchat import hybrid
    from memchat.ui import hybrid_app

    assert set(hybrid_app.ROUTES) == set(hybrid.ROUTES)
    assert all(hybrid_app.ROUTES[r].strip() for r in hybrid.ROUTES)
