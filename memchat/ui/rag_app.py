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
from memchat.errors import MemChatError
from memchat.knowledge import KnowledgeBase


@st.cache_resource(show_spinner="Loading the language model (once per server)...")
def get_generator(model_name: str):
    from memchat.generation import Generator

    return Generator(model_name)


@st.cache_resource(show_spinner="Loading the embedding model (once per server)...")
def get_embedder(model_name: str, backend: str):
    from memchat.embeddings import Embedder

    return Embedder(model_name, backend=backend)


def knowledge_base() -> KnowledgeBase:
    kb = KnowledgeBase()
    spec = kb.embedding_spec()
    model = spec["model"] if spec else kb.embed_cfg.model_name
    backend = spec.get("backend", kb.embed_cfg.backend) if spec else kb.embed_cfg.backend
    kb._embedder = get_embedder(model, backend)
    return kb


def show_sources(answer) -> None:
    if answer.evidence_line:
        st.caption(answer.evidence_line)
    if answer.hits:
        st.markdown("**Sources:** " + "; ".join(answer.citations))
        with st.expander(f"Retrieved passages ({len(answer.hits)})"):
            for h in answer.hits:
                st.markdown(f"**{h.citation}** · score {h.score:.2f}")
                st.text(h.text)


def sidebar(kb: KnowledgeBase) -> list[dict]:
    st.sidebar.header("Documents")
    uploads = st.sidebar.file_uploader("Add PDFs", type=["pdf"], accept_multiple_files=True, key="uploader")
    if uploads and st.sidebar.button("Add to knowledge base", type="primary"):
        bars = {u.name: st.sidebar.progress(0.0, text=f"{u.name}: waiting") for u in uploads}

        def progress(name: str, frac: float, stage: str) -> None:
            if name in bars:
                bars[name].progress(min(frac, 1.0), text=f"{name}: {stage}")

        try:
            results = kb.add_documents([(u.name, u.getvalue()) for u in uploads], progress=progress)
        except MemChatError as exc:
            st.sidebar.error(str(exc))
            results = []
        for r in results:
            (st.sidebar.error if r.status == "error" else st.sidebar.success)(r.message)
    try:
        docs = kb.documents()
    except MemChatError as exc:
        st.error(str(exc))
        st.stop()
    for d in docs:
        c1, c2 = st.sidebar.columns([4, 1])
        c1.markdown(f"**{d['name']}**  \nv{d['version']} · {d['pages']} pages · {d['chunks']} chunks")
        if c2.button("✕", key=f"rm-{d['name']}", help=f"Remove {d['name']}"):
            kb.remove(d["name"])
            st.rerun()
    return docs


def render() -> None:
    st.set_page_config(page_title="Mem_Chat", page_icon="📄")
    st.title("📄 Mem_Chat")
    st.caption("Ask your own PDFs. Everything stays on this machine, encrypted at rest.")
    if "messages" not in st.session_state:
        st.session_state.messages = []

    try:
        kb = knowledge_base()
    except MemChatError as exc:  # wrong key, damaged store: say so, touch nothing
        st.error(str(exc))
        st.stop()
    docs = sidebar(kb)
    if not docs:
        st.info("Add PDFs in the sidebar to start. They are stored encrypted in encrypted_faiss_storage/.")
        st.stop()

    model_name = os.environ.get("MEMCHAT_LLM", GenerationConfig.model_name)
    generator = get_generator(model_name)
    if generator.notice:
        st.warning(generator.notice)

    for msg in st.session_state.messages:
        with st.chat_message(msg["role"]):
            st.markdown(msg["content"])
            if msg.get("answer") is not None:
                show_sources(msg["answer"])

    if prompt := st.chat_input("Ask a question about your documents"):
        st.session_state.messages.append({"role": "user", "content": prompt})
        with st.chat_message("user"):
            st.markdown(prompt)
        from memchat.rag import RAGPipeline

        rag = RAGPipeline(kb, generator, generation=GenerationConfig(model_name=model_name))
        with st.chat_message("assistant"):
            try:
                pieces, answer = rag.stream(prompt)
                st.write_stream(pieces)
            except MemChatError as exc:
                st.error(str(exc))
                st.stop()
            show_sources(answer)
        st.session_state.messages.append({"role": "assistant", "content": answer.text, "answer": answer})
