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

from memchat import config
from memchat.errors import MemChatError
from memchat.finetuned import FineTunedChat


@st.cache_resource(show_spinner="Loading the fine-tuned model (once per server)...")
def _finetuned(model_dir: str, stamp: float) -> FineTunedChat:
    return FineTunedChat(model_dir)


def load_finetuned(model_dir: str | Path | None = None) -> FineTunedChat:
    """The cached model of ``model_dir`` (default finetuned_model/). Raises MemChatError."""
    model_dir = Path(model_dir) if model_dir else config.finetuned_dir()
    files = [model_dir / "config.json", model_dir / config.FINETUNED_META_FILENAME]
    stamp = max((f.stat().st_mtime for f in files if f.exists()), default=0.0)  # retraining -> a new key
    return _finetuned(str(model_dir), stamp)


def model_summary(chat: FineTunedChat) -> str:
    meta = chat.meta
    if not meta:
        return f"{chat.model_dir} (no Mem_Chat metadata)"
    results, records = meta.get("results") or {}, ((meta.get("dataset") or {}).get("records") or {})
    loss = results.get("eval_loss") if results.get("eval_loss") is not None else results.get("train_loss")
    docs = len((meta.get("lineage") or {}).get("documents") or [])
    parts = [chat.display_name, f"trained {str(meta.get('created', '?'))[:16].replace('T', ' ')}",
             f"{records.get('train', '?')} training pairs from {docs} documents"]
    if loss is not None:
        parts.append(f"{'validation' if results.get('eval_loss') is not None else 'training'} loss {loss:.3f}")
    return " · ".join(parts)


def generation_settings(container=st.sidebar) -> dict:
    """The guide's generate_response settings, adjustable."""
    container.subheader("Fine-tuned model")
    sample = container.toggle("Sample (off = greedy, reproducible)", value=True, key="ft_sample")
    temperature = container.slider("Temperature", 0.1, 1.5, 0.7, 0.1, disabled=not sample, key="ft_temperature")
    max_length = container.slider("Max length (prompt + answer tokens)", 64, 1024, 512, 32, key="ft_max_length")
    return dict(max_length=max_length, temperature=temperature, do_sample=sample)


def render(model_dir: str | Path | None = None) -> None:
    st.set_page_config(page_title="Mem_Chat: fine-tuned model", page_icon="🧠")
    st.title("🧠 Mem_Chat: fine-tuned model")
    st.caption("Answers from the model's own weights, trained on your documents: no retrieval, so no citations. "
               "For cited answers use the RAG app (python main.py) or the hybrid app (streamlit run main_hybrid.py).")
    if "ft_messages" not in st.session_state:
        st.session_state.ft_messages = []

    try:
        chat = load_finetuned(model_dir)
    except MemChatError as exc:
        st.info(str(exc))
        st.stop()
    if chat.notice:
        st.warning(chat.notice)
    stale = chat.staleness()
    if stale:
        st.warning(stale)
    st.sidebar.caption(model_summary(chat))
    settings = generation_settings()

    for msg in st.session_state.ft_messages:
        with st.chat_message(msg["role"]):
            st.markdown(msg["content"])
            if msg.get("caption"):
                st.caption(msg["caption"])

    if prompt := st.chat_input("Ask the fine-tuned model"):
        st.session_state.ft_messages.append({"role": "user", "content": prompt})
        with st.chat_message("user"):
            st.markdown(prompt)
        with st.chat_message("assistant"):
            t0 = time.perf_counter()
            try:
                text = st.write_stream(chat.stream(prompt, **settings))
            except MemChatError as exc:
                st.error(str(exc))
                st.stop()
            caption = f"⏱ {time.perf_counter() - t0:.1f} s · {chat.display_name}"
            st.caption(caption)
        st.session_state.ft_messages.append({"role": "assistant", "content": text or "", "caption": caption})
