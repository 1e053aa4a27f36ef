"""The Streamlit chat with the fine-tuned model (``streamlit run test_finetuned_model.py streamlit``).

The model answers from its own weights: no retrieval, so no citations. Answers
stream token by token with the time each took. The model loads once per server
through ``st.cache_resource`` (again only when its folder changes: a retrained
model is picked up on the next rerun). A model older than the knowledge base gets
a visible warning; no model gets one line saying how to make it.
"""

from __future__ import annotations

import time
from pathlib import Path

import streamlit as st

from memchat.ui.common import (chat_question, errors_shown, generation_settings, load_finetuned, md_escape,
                               model_summary, require_login, show_text, stream_text)


def render(model_dir: str | Path | None = None) -> None:
    st.set_page_config(page_title="Mem_Chat: fine-tuned model", page_icon="🧠")
    require_login("Mem_Chat: fine-tuned model")
    st.title("🧠 Mem_Chat: fine-tuned model")
    st.caption("Answers from the model's own weights, trained on your documents: no retrieval, so no citations. "
               "For cited answers use the RAG app (python main.py) or the hybrid app (streamlit run main_hybrid.py).")
    if "ft_messages" not in st.session_state:
        st.session_state.ft_messages = []

    from memchat.errors import MemChatError

    try:
        chat = load_finetuned(model_dir)
    except MemChatError as exc:  # no model yet: a hint, not an error
        st.info(md_escape(str(exc)))
        st.stop()
    if chat.notice:
        st.warning(chat.notice)
    try:
        stale = chat.staleness()
    except MemChatError as exc:  # the store does not open: the model still answers
        stale = str(exc)
    if stale:
        st.warning(md_escape(stale))
    st.sidebar.caption(model_summary(chat))
    settings = generation_settings()

    for msg in st.session_state.ft_messages:
        with st.chat_message(msg["role"]):
            show_text(msg["content"])
            if msg.get("caption"):
                st.caption(msg["caption"])

    if prompt := chat_question("Ask the fine-tuned model"):
        st.session_state.ft_messages.append({"role": "user", "content": prompt})
        with st.chat_message("user"):
            show_text(prompt)
        with st.chat_message("assistant"):
            t0 = time.perf_counter()
            with errors_shown():
                text = stream_text(chat.stream(prompt, **settings))
            caption = f"⏱ {time.perf_counter() - t0:.1f} s · {md_escape(chat.display_name)}"
            st.caption(caption)
        st.session_state.ft_messages.append({"role": "assistant", "content": text or "", "caption": caption})
