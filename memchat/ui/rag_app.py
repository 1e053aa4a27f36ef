"""The Streamlit RAG app (``python main.py`` / ``streamlit run main.py``).

Upload PDFs (progress per file), see and remove documents, and chat: answers
stream token by token, with the evidence sentence and citations (file, page)
under each answer and the retrieved chunks expandable. Models load once per
server through ``st.cache_resource``.

Environment: ``MEMCHAT_LLM`` overrides the generation model (hub id or folder).
"""

from __future__ import annotations

import os

import streamlit as st

from memchat.config import GenerationConfig
from memchat.knowledge import KnowledgeBase
from memchat.ui.common import (chat_question, errors_shown, get_generator, md_escape, require_login,
                               shared_knowledge_base, shared_rag_pipeline, show_sources, show_text, split_oversized,
                               stream_text)


def knowledge_base() -> KnowledgeBase:
    return shared_knowledge_base()


def sidebar(kb: KnowledgeBase) -> list[dict]:
    st.sidebar.header("Documents")
    uploads = st.sidebar.file_uploader("Add PDFs", type=["pdf"], accept_multiple_files=True, key="uploader")
    if uploads and st.sidebar.button("Add to knowledge base", type="primary"):
        uploads, refused = split_oversized(uploads)
        for line in refused:
            st.sidebar.error(line)
        bars = {u.name: st.sidebar.progress(0.0, text=f"{md_escape(u.name)}: waiting") for u in uploads}

        def progress(name: str, frac: float, stage: str) -> None:
            if name in bars:
                bars[name].progress(min(frac, 1.0), text=f"{md_escape(name)}: {stage}")

        results = []
        with errors_shown(st.sidebar):
            results = kb.add_documents([(u.name, u.getvalue()) for u in uploads], progress=progress)
        for r in results:
            (st.sidebar.error if r.status == "error" else st.sidebar.success)(md_escape(r.message))
    with errors_shown():
        docs = kb.documents()
    for d in docs:
        c1, c2 = st.sidebar.columns([4, 1])
        c1.markdown(f"**{md_escape(d['name'])}**  \nv{d['version']} · {d['pages']} pages · {d['chunks']} chunks")
        if c2.button("✕", key=f"rm-{d['name']}", help=f"Remove {md_escape(d['name'])}"):
            with errors_shown(st.sidebar):
                kb.remove(d["name"])
            st.rerun()
    return docs


def render() -> None:
    st.set_page_config(page_title="Mem_Chat", page_icon="📄")
    require_login("Mem_Chat")
    st.title("📄 Mem_Chat")
    st.caption("Ask your own PDFs. Everything stays on this machine, encrypted at rest.")
    if "messages" not in st.session_state:
        st.session_state.messages = []

    with errors_shown():  # wrong key, damaged store: say so, touch nothing
        kb = knowledge_base()
    docs = sidebar(kb)
    if not docs:
        st.info("Add PDFs in the sidebar to start. They are stored encrypted in encrypted_faiss_storage/.")
        st.stop()

    from memchat.config import ANSWER_MODES, RAGConfig

    default_mode = RAGConfig().mode  # MEMCHAT_ANSWER_MODE or "auto"
    mode = st.sidebar.selectbox(
        "Answer mode", ANSWER_MODES, index=ANSWER_MODES.index(default_mode) if default_mode in ANSWER_MODES else 0,
        help="extractive: a phrase copied from your documents; generative: the model writes it and Mem_Chat checks "
             "it against them; auto: extractive for small models, generative for 1B+ models")
    model_name = os.environ.get("MEMCHAT_LLM", GenerationConfig.model_name)
    with errors_shown():
        generator = get_generator(model_name)
    if generator.notice:
        st.warning(generator.notice)

    for msg in st.session_state.messages:
        with st.chat_message(msg["role"]):
            show_text(msg["content"])
            if msg.get("answer") is not None:
                show_sources(msg["answer"])

    if prompt := chat_question("Ask a question about your documents"):
        st.session_state.messages.append({"role": "user", "content": prompt})
        with st.chat_message("user"):
            show_text(prompt)
        with st.chat_message("assistant"):
            with errors_shown():
                rag = shared_rag_pipeline(kb, generator, model_name, mode)
                pieces, answer = rag.stream(prompt)
                slot = st.empty()
                streamed = stream_text(pieces, slot)
                if streamed.strip() != answer.text.strip():  # a generated draft the evidence did not support
                    show_text(answer.text, slot)
            show_sources(answer)
        st.session_state.messages.append({"role": "assistant", "content": answer.text, "answer": answer})
