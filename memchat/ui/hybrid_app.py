"""The Streamlit hybrid app (``streamlit run main_hybrid.py``): RAG, fine-tuned, hybrid, or all three.

Modes:
  RAG         retrieve -> evidence -> grounded answer, with citations (``memchat.rag``)
  Fine-tuned  the fine-tuned model alone, from its weights: no citations
  Hybrid      the fine-tuned draft widens retrieval; the evidence picks the draft or the
              grounded answer, shown with that evidence and cited (``memchat.hybrid``)
  Compare     the three side by side on the same question

Every answer shows the time it took; every answer that used retrieval shows its
sources (file, page). Without a knowledge base the RAG and hybrid modes are
disabled with the reason; without a fine-tuned model, likewise the modes that need
it. Models load once per server through ``st.cache_resource``, and only when a
mode needs them.

Environment: ``MEMCHAT_LLM`` overrides the RAG generation model (hub id or folder).
"""

from __future__ import annotations

import os
import time

import streamlit as st

from memchat.config import GenerationConfig
from memchat.errors import MemChatError
from memchat.hybrid import DEFAULT_STRATEGY, STRATEGIES
from memchat.knowledge import KnowledgeBase
from memchat.ui.common import (chat_question, errors_shown, generation_settings, get_generator, load_finetuned,
                               md_escape, model_summary, require_login, shared_knowledge_base, shared_rag_pipeline,
                               show_sources, show_text, stream_text)

MODES = ["RAG", "Fine-tuned", "Hybrid", "Compare"]
ROUTES = {  # HybridAnswer.route -> what the caption says produced the answer
    "grounded": "grounded in the evidence",
    "draft+grounded": "grounded in the evidence; the fine-tuned draft agreed",
    "draft": "the fine-tuned draft, backed by the evidence",
    "finetuned": "the fine-tuned model alone (the documents did not match)",
}
NO_STORE = ("No knowledge base in encrypted_faiss_storage/ yet. Add PDFs first: python main.py "
            "(the RAG app), or python main.py add FILE.pdf")


def availability(kb: KnowledgeBase) -> tuple[dict, object]:
    """(reason each mode is unavailable, or None; the fine-tuned model or None)."""
    with errors_shown():  # a store that does not open (wrong key, damaged)
        docs = kb.documents()
    rag_reason = None if docs else NO_STORE
    chat, ft_reason = None, None
    try:
        chat = load_finetuned()
    except MemChatError as exc:  # missing, or metadata of another version: the RAG mode still works
        ft_reason = md_escape(str(exc))
    both = " ".join(r for r in (rag_reason, ft_reason) if r) or None
    return {"RAG": rag_reason, "Fine-tuned": ft_reason, "Hybrid": both, "Compare": both}, chat


def run_retrieving(system: str, engine, prompt: str) -> dict:
    """Stream the answer of ``engine`` (the RAG pipeline or the hybrid: both stream and fill an Answer)."""
    pieces, answer = engine.stream(prompt)
    t0 = time.perf_counter()
    stream_text(pieces)
    seconds = answer.seconds or time.perf_counter() - t0
    result = {"system": system, "text": answer.text, "answer": answer, "seconds": seconds, "model": answer.model}
    show_result_footer(result)
    return result


def run_finetuned(chat, prompt: str, settings: dict) -> dict:
    t0 = time.perf_counter()
    text = stream_text(chat.stream(prompt, **settings))
    result = {"system": "Fine-tuned", "text": text or "", "answer": None, "seconds": time.perf_counter() - t0,
              "model": chat.display_name}
    show_result_footer(result)
    return result


def show_result_footer(result: dict) -> None:
    answer = result["answer"]
    if answer is not None:
        show_sources(answer)
        if getattr(answer, "draft", ""):
            with st.expander("Fine-tuned draft (used to widen the search)"):
                st.text(answer.draft)
    else:
        st.caption("No retrieval: no citations.")
    route = ROUTES.get(getattr(answer, "route", "") if answer is not None else "", "")
    st.caption(f"⏱ {result['seconds']:.1f} s · {md_escape(result['model'])}" + (f" · answer: {route}" if route else ""))


def show_history() -> None:
    for msg in st.session_state.hybrid_messages:
        with st.chat_message(msg["role"]):
            if msg["role"] == "user":
                show_text(msg["content"])
                continue
            results = msg["results"]
            columns = st.columns(len(results)) if len(results) > 1 else [st.container()]
            for col, result in zip(columns, results):
                with col:
                    if len(results) > 1:
                        st.markdown(f"**{result['system']}**")
                    show_text(result["text"])
                    show_result_footer(result)


def render() -> None:
    st.set_page_config(page_title="Mem_Chat hybrid", page_icon="🔀", layout="wide")
    require_login("Mem_Chat hybrid")
    st.title("🔀 Mem_Chat: RAG, fine-tuned, or both")
    st.caption("RAG reads your documents at answer time and cites them; the fine-tuned model answers from what it "
               "learned; the hybrid uses the fine-tuned model's draft to find the right passages, and lets the "
               "evidence decide between that draft and the grounded answer.")
    if "hybrid_messages" not in st.session_state:
        st.session_state.hybrid_messages = []

    kb = shared_knowledge_base()
    reasons, chat = availability(kb)
    available = [m for m in MODES if reasons[m] is None]
    if not available:
        st.info("Nothing to chat with yet. " + reasons["Hybrid"])
        st.stop()
    mode = st.sidebar.radio(
        "Mode", MODES, index=MODES.index(available[0]), key="mode",
        captions=["unavailable: see below" if reasons[m] else "" for m in MODES],
    )
    for m in MODES:
        if reasons[m] and m in ("RAG", "Fine-tuned"):
            st.sidebar.caption(f"**{m} unavailable.** {reasons[m]}")
    if chat is not None:
        st.sidebar.caption(model_summary(chat))
        if chat.notice:
            st.warning(chat.notice)
        try:
            stale = chat.staleness(kb=kb)
        except MemChatError as exc:
            stale = str(exc)
        if stale:
            st.warning(md_escape(stale))
    settings = generation_settings() if mode in ("Fine-tuned", "Compare") else {}
    strategy = DEFAULT_STRATEGY
    if mode in ("Hybrid", "Compare"):
        strategy = st.sidebar.selectbox("Hybrid strategy", STRATEGIES, index=STRATEGIES.index(DEFAULT_STRATEGY),
                                        help="verify: the draft widens retrieval, and replaces the grounded answer "
                                             "only when the evidence backs it better; expand: always the grounded "
                                             "answer; route: RAG or the fine-tuned model by retrieval score")

    show_history()
    if reasons[mode]:
        st.info(f"{mode} mode is unavailable. {reasons[mode]}")
        st.stop()

    rag = hybrid = None
    if mode != "Fine-tuned":
        model_name = os.environ.get("MEMCHAT_LLM", GenerationConfig.model_name)
        with errors_shown():
            generator = get_generator(model_name)
        if generator.notice:
            st.warning(generator.notice)
        with errors_shown():
            rag = shared_rag_pipeline(kb, generator, model_name)
            if mode in ("Hybrid", "Compare"):
                from memchat.hybrid import HybridPipeline

                hybrid = HybridPipeline(rag, chat, strategy=strategy)

    if prompt := chat_question("Ask a question about your documents"):
        st.session_state.hybrid_messages.append({"role": "user", "content": prompt})
        with st.chat_message("user"):
            show_text(prompt)
        with st.chat_message("assistant"):
            with errors_shown():
                if mode == "RAG":
                    results = [run_retrieving("RAG", rag, prompt)]
                elif mode == "Fine-tuned":
                    results = [run_finetuned(chat, prompt, settings)]
                elif mode == "Hybrid":
                    results = [run_retrieving("Hybrid", hybrid, prompt)]
                else:
                    results = []
                    for col, (name, run) in zip(st.columns(3), [
                        ("RAG", lambda: run_retrieving("RAG", rag, prompt)),
                        ("Fine-tuned", lambda: run_finetuned(chat, prompt, settings)),
                        ("Hybrid", lambda: run_retrieving("Hybrid", hybrid, prompt)),
                    ]):
                        with col:
                            st.markdown(f"**{name}**")
                            results.append(run())
        st.session_state.hybrid_messages.append({"role": "assistant", "results": results})
